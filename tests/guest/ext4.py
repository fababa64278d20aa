"""What a rebuilt point in time holds, read on the host with e2fsprogs (never mounted).

A point in time of a running guest is crash-consistent: e2fsck may replay the journal
(exit status 1, "file system modified") and nothing else, and after that the file system must
be clean (`e2fsck -fn` exits 0). The files are then listed and read with debugfs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.harness.tools import require_tool, run, run_result

# What e2fsck may fix in a crash-consistent image beyond the journal replay: the superblock's
# free counts, which ext4 does not keep up to date while mounted (it sums the group
# descriptors at mount time).
PROMPT = re.compile(r"\w+\? yes")
STALE_SUMMARY = re.compile(r"Free (blocks|inodes) count wrong \(\d+, counted=\d+\)\.")


def check_consistent(image: Path, *, clean: bool = False) -> str:
    """Run `e2fsck -fy` on a copy of the raw `image`: it may replay the journal and fix the
    superblock's free counts (exit status 1), nothing else, and the copy must then be clean.
    A `clean` image (taken with the file system frozen) must need nothing at all.
    Returns the path of the checked copy."""
    copy = image.with_suffix(".fsck")
    shutil.copyfile(image, copy)
    if clean:
        as_is = run_result([require_tool("e2fsck"), "-fn", str(copy)], timeout=120)
        assert as_is.returncode == 0, f"{image} is not clean:\n{as_is.stdout}{as_is.stderr}"
    fix = run_result([require_tool("e2fsck"), "-fy", str(copy)], timeout=120)
    assert fix.returncode in (0, 1), f"e2fsck -fy {image}: {fix.returncode}\n{fix.stdout}"
    # Each repair ends in a "Fix? yes" (or "Clear? yes", ...), after the problem on its line
    # or alone on the next one.
    lines = [line for line in fix.stdout.splitlines() if line.strip()]
    fixed = [
        lines[i - 1] if PROMPT.fullmatch(line) and i else line
        for i, line in enumerate(lines)
        if line.endswith("? yes")
    ]
    assert all(STALE_SUMMARY.fullmatch(f) for f in fixed), f"{image}:\n{fix.stdout}"
    again = run_result([require_tool("e2fsck"), "-fn", str(copy)], timeout=120)
    assert again.returncode == 0, f"{image} after e2fsck -fy:\n{fix.stdout}\n{again.stdout}"
    return str(copy)


def regular_files(image: str) -> list[str]:
    """Names of the regular files in the root directory of the ext4 `image`."""
    out = run([require_tool("debugfs"), "-R", "ls -p /", image])
    names = []
    for line in out.splitlines():
        # /inode/mode/uid/gid/name/size/ (mode in octal: 100644 for a regular file)
        fields = line.split("/")
        if len(fields) >= 7 and fields[2].startswith("10"):
            names.append(fields[5])
    return sorted(names)


def read_file(image: str, name: str) -> bytes:
    """The content of /`name` in the ext4 `image`."""
    result = subprocess.run(
        [require_tool("debugfs"), "-R", f"cat /{name}", image],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout
