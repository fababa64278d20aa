"""A real Linux guest writes files to its ext4 data disk while nbdsrv (`--qmp`, on a monitor
of its own) takes one full and several incremental backups of it.

Each point in time is rebuilt on the host (full: nbdcopy; incremental: the previous rebuild
plus the `qemu:dirty-bitmap:` extents since the previous checkpoint, as a backup tool does),
must pass e2fsck (journal replay allowed, nothing else) and must hold exactly the files the
guest had finished writing (written and synced) before `backup begin`, each with its
content; files written, overwritten in place or removed during the session must not show.
A guest process keeps rewriting other files (in a subdirectory) with fsync while each session
begins, so the point in time falls among writes in flight. The last one is `--quiesce`d
through the guest agent: its image must be clean as it is (no journal to replay).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.guest.ext4 import check_consistent, read_file, regular_files
from tests.guest.files import Files
from tests.guest.vm import DISK_ID, GuestVM
from tests.harness.checksums import sha256 as sha
from tests.harness.daemon import DaemonProcess, nbdsrv_argv
from tests.harness.qsd import COPY_SCRIPT
from tests.harness.tools import require_tool, run

K = 1024
INCREMENTALS = 3


def full_copy(uri: str, target: Path) -> None:
    run([require_tool("nbdcopy"), uri, str(target)], timeout=120)


def incremental_copy(uri: str, context: str, target: Path) -> list[tuple[int, int]]:
    """Read only the dirty extents of `context` into `target` (libnbd, Debian's python3)."""
    out = run(["/usr/bin/python3", str(COPY_SCRIPT), uri, context, str(target)], timeout=120)
    return [(int(o), int(n)) for o, n in json.loads(out)]


def check_point_in_time(image: Path, expected: dict[str, bytes], quiesced: bool) -> None:
    checked = check_consistent(image, clean=quiesced)
    assert regular_files(checked) == sorted(expected), image.name
    for name, data in expected.items():
        assert sha(read_file(checked, name)) == sha(data), f"{image.name}: /{name}"


def test_full_and_incremental_backups_of_a_running_guest(
    guest_vm: GuestVM, guest_workdir: Path
) -> None:
    vm = guest_vm
    control = str(guest_workdir / "control.sock")
    nbd = guest_workdir / "nbd.sock"
    daemon = DaemonProcess(
        ["--state-dir", str(guest_workdir / "state"), "--listen", f"unix:{nbd}",
         "--qmp", f"vm={vm.qmp_path}", "--qga", f"vm={vm.agent_path}"],
        control, guest_workdir / "daemon.log",
    )  # fmt: skip
    daemon.start()
    try:
        _backups(vm, daemon, control, nbd, guest_workdir)
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()
        print(f"--- guest console\n{vm.console_text()}\n--- nbdsrv log\n{daemon.log()}")


def _backups(vm: GuestVM, daemon: DaemonProcess, control: str, nbd: Path, work: Path) -> None:
    def cli(*args: str) -> Any:
        return json.loads(run(nbdsrv_argv(*args, "--control", control, "--json"), timeout=60))

    def end(session: dict[str, Any]) -> None:
        run(nbdsrv_argv("backup", "end", "vm", session["id"], "--control", control))

    assert daemon.status()["vms"][0]["disks"] == [DISK_ID]
    uri = f"nbd+unix:///vm/{DISK_ID}?socket={nbd}"
    files = Files(vm)
    points: list[tuple[Path, dict[str, bytes], bool]] = []  # image, files, quiesced

    # The full backup.
    for i, size in enumerate((1 * K, 100 * K, 1024 * K, 300 * K)):
        files.write(f"a{i}", size)
    points.append((work / "pit0.raw", dict(files.now), False))
    churn = vm.start_churn()
    session = cli("backup", "begin", "vm", "--checkpoint", "c0")
    vm.stop_churn(churn)
    assert session["disks"][DISK_ID]["contexts"] == ["base:allocation"]
    # During the session, after its point in time: none of this may show in it.
    files.write("during0", 200 * K)
    files.write("a1", 100 * K)  # a new file of the same name
    files.overwrite("a3")  # the same blocks, new content
    files.remove("a2")
    full_copy(uri, points[0][0])
    end(session)

    # Incrementals, each since the previous checkpoint.
    for n in range(1, INCREMENTALS + 1):
        files.write(f"b{n}", n * 150 * K)
        files.write("a0", 2 * K * n)
        if n == 2:
            files.remove("during0")
        image = work / f"pit{n}.raw"
        quiesce = n == INCREMENTALS
        points.append((image, dict(files.now), quiesce))
        churn = vm.start_churn()
        begin = ["backup", "begin", "vm", "--from", f"c{n - 1}", "--checkpoint", f"c{n}"]
        if quiesce:  # nbdsrv talks to the agent itself: its channel serves one client
            vm.disconnect_agent()
            session = cli(*begin, "--quiesce")
            vm.connect_agent()
        else:
            session = cli(*begin)
        vm.stop_churn(churn)
        assert session["quiesced"] is quiesce
        context = f"qemu:dirty-bitmap:c{n - 1}"
        assert session["disks"][DISK_ID]["contexts"] == ["base:allocation", context]
        files.write(f"during{n}", 64 * K)
        files.write(f"b{n}", 10 * K)
        files.overwrite("a0")
        shutil.copyfile(points[n - 1][0], image)
        dirty = incremental_copy(uri, context, image)
        assert dirty, f"c{n - 1}: nothing dirty"
        # Only what the guest changed: far less than the 64 MiB disk.
        assert sum(length for _, length in dirty) < 16 * 1024 * K, dirty
        end(session)

    for image, expected, quiesced in points:
        check_point_in_time(image, expected, quiesced)

    listed = cli("checkpoint", "list", "vm")
    assert [(c["name"], c["valid"]) for c in listed] == [
        (f"c{n}", True) for n in range(INCREMENTALS + 1)
    ]
    # Every session ended: nothing of them is left in QEMU.
    assert vm.qmp is not None
    assert vm.qmp.cmd("query-block-jobs") == []
    nodes = [n["node-name"] for n in vm.qmp.cmd("query-named-block-nodes", flat=True)]
    assert not [n for n in nodes if n.startswith("nbdsrv-")], nodes
