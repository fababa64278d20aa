"""What a rebuilt point in time holds, read on the host with e2fsprogs (never mounted).

A point in time of a running guest is crash-consistent: e2fsck may replay the journal
(exit status 1, "file system modified"), and after that the file system must be clean
(`e2fsck -fn` exits 0). The files are then listed and read with debugfs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.tools import require_tool, run, run_result


def check_consistent(image: Path) -> str:
    """Run `e2fsck -fy` on a copy of the raw `image`: 0 or 1 (journal replayed) is fine, and
    the copy must then be clean. Returns the path of the checked copy."""
    copy = image.with_suffix(".fsck")
    shutil.copyfile(image, copy)
    fix = run_result([require_tool("e2fsck"), "-fy", str(copy)], timeout=120)
    assert fix.returncode in (0, 1), f"e2fsck -fy {image}: {fix.returncode}\n{fix.stdout}"
    again = run_result([require_tool("e2fsck"), "-fn", str(copy)], timeout=120)
    assert again.returncode == 0, (
        f"{image} needed more than a journal replay:\n{fix.stdout}\n--- then:\n{again.stdout}"
    )
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
