"""--scratch-limit is a cap, and a broken session lets go at once (issue 19 §4):

- a fast writer against a small limit: QEMU's write threshold breaks the session as the
  scratch crosses the limit (the overshoot is printed), the filter leaves the guest's write
  path and the scratch files go before `backup end`; the guest's writes all succeed;
- the first EIO that QEMU answers to a relayed READ fails the session (no probe needed), and
  the refused READs that follow are logged as one line with their count.
"""

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, K, MiB, attached_daemon
from tests.harness.tools import require_tool
from tests.harness.waiting import wait_for
from tests.sessions.test_point_in_time import GuestVM, guest_workdir
from tests.sessions.test_point_in_time import leftovers as qemu_leftovers

__all__ = ["guest_workdir"]

DISK = 256 * MiB
WRITTEN = 128 * MiB


def qemu_io(nbd_socket: str, export: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = [require_tool("qemu-io"), "-f", "raw"]
    if export.startswith("vm1/"):
        argv.append("-r")  # nbdsrv's session exports are read-only
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(
        [*argv, f"nbd+unix:///{export}?socket={nbd_socket}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def big_vm(workdir: Path) -> Iterator[ExternalQSD]:
    image = workdir / "big.qcow2"
    subprocess.run(
        [require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), str(DISK)],
        check=True,
    )
    qsd = ExternalQSD(workdir, [image])
    qsd.start()
    yield qsd
    qsd.close()


class ScratchWatcher(threading.Thread):
    """The most the scratch images took on disk, looked at as often as the test can."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.most = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            total = 0
            for path in self.directory.glob("*.qcow2"):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_blocks * 512
            self.most = max(self.most, total)
            time.sleep(0.0005)


def cbw_nodes(vm: ExternalQSD) -> list[str]:
    assert vm.qmp is not None
    return [
        n["node-name"]
        for n in vm.qmp.cmd("query-named-block-nodes", flat=True)
        if n["drv"] in ("copy-before-write", "snapshot-access")
    ]


@pytest.mark.parametrize("limit", [4 * MiB, 2 * MiB])
def test_fast_writer_is_capped_and_the_scratch_freed_before_the_end(
    big_vm: ExternalQSD, workdir: Path, limit: int
) -> None:
    vm = big_vm
    assert qemu_io(vm.nbd_path, "disk0", f"write -P 0x11 0 {WRITTEN}").returncode == 0
    daemon = attached_daemon(workdir, vm, "--scratch-limit", str(limit))
    daemon.start()
    try:
        session = daemon.json("backup", "begin", "vm1", "--no-checkpoint")
        scratch = workdir / "state" / "scratch"
        watcher = ScratchWatcher(scratch)
        watcher.start()
        # Every block holds old data: each first write copies it into the scratch. 1 MiB
        # writes one after the other, as fast as they go (a guest's requests are this size).
        writes = [f"write -P 0x22 {offset} 1M" for offset in range(0, WRITTEN, 1 * MiB)]
        writer = qemu_io(vm.nbd_path, "disk0", *writes)
        assert writer.returncode == 0 and "error" not in writer.stdout.lower(), writer
        wait_for(lambda: daemon.json("backup", "list", "vm1")[0]["state"] == "failed", "break")
        [listed] = daemon.json("backup", "list", "vm1")
        assert "--scratch-limit" in listed["error"]
        # Before `backup end`: no filter in the guest's path, no scratch on disk.
        wait_for(lambda: cbw_nodes(vm) == [], "the filter to leave the guest's path")
        wait_for(lambda: list(scratch.glob("*.qcow2")) == [], "the scratch to be freed")
        watcher.running = False
        watcher.join()
        print(f"--scratch-limit {limit}: the scratch took at most {watcher.most} bytes")
        read = qemu_io(daemon.nbd_socket, "vm1/disk0", "read 0 64k")
        assert "Input/output error" in read.stdout + read.stderr, read
        assert qemu_io(vm.nbd_path, "disk0", "write -P 0x33 0 1M").returncode == 0
        daemon.json("backup", "end", "vm1", session["id"])
        assert daemon.json("backup", "list", "vm1") == []
        assert not list((workdir / "state").rglob("*.qcow2"))
        # The cap: the limit plus the writes in flight when QEMU told, never most of the
        # 128 MiB rewritten.
        assert watcher.most < limit + 16 * MiB
    finally:
        daemon.stop()


def test_first_relayed_eio_fails_the_session_and_refusals_are_counted(
    vm: ExternalQSD, nbdsrv: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """blkdebug fails every write into the scratch: QEMU breaks the snapshot and says
    nothing on QMP. With the probe out of the way, the reader's own EIO must fail it."""
    monkeypatch.setenv("NBDSRV_PROBE_INTERVAL", "3600")
    vm.write(0, 0x11, 0, 1 * MiB)
    nbdsrv.stop()
    nbdsrv.start(fault="scratch-write-error")
    session = nbdsrv.json("backup", "begin", "vm1", "--no-checkpoint")
    vm.write(0, 0x99, 0, 64 * K)  # the copy fails: the snapshot breaks, the guest goes on
    assert nbdsrv.json("backup", "list", "vm1")[0]["state"] == "running"
    first = qemu_io(nbdsrv.nbd_socket, "vm1/disk0", "read 0 64k")
    assert "Input/output error" in first.stdout + first.stderr
    [listed] = nbdsrv.json("backup", "list", "vm1")
    assert listed["state"] == "failed", listed
    assert "can no longer read the point in time" in listed["error"]
    # The broken point in time leaves QEMU at once: no filter in the guest's path, no scratch.
    wait_for(lambda: cbw_nodes(vm) == [], "the filter to leave the guest's path")
    wait_for(lambda: not list(Path(nbdsrv.state_dir).rglob("*.qcow2")), "the scratch to go")
    vm.write(0, 0x9A, 0, 64 * K)
    # Many refused READs: no line each, one line for the session with the count at the end.
    many = qemu_io(nbdsrv.nbd_socket, "vm1/disk0", *[f"read {i * 64}k 64k" for i in range(50)])
    assert "Input/output error" in many.stdout + many.stderr
    nbdsrv.json("backup", "end", "vm1", session["id"])
    log = nbdsrv.log()
    assert log.count("READ at") == 0, log
    counted = [line for line in log.splitlines() if "requests refused with EIO" in line]
    assert len(counted) == 1 and " WARNING " in counted[0], counted
    assert " 51 requests refused" in counted[0] or " 52 requests refused" in counted[0], counted


def test_scratch_limit_on_a_running_vm_frees_at_once(guest_workdir: Path) -> None:
    """The same on a VM with vCPUs: the filters leave the devices' path (qom-set back) and
    the scratch goes before `backup end`; the guest's writes go on."""
    vm = GuestVM(guest_workdir, running=True)
    control = str(guest_workdir / "control.sock")
    daemon = DaemonProcess(
        ["--state-dir", str(guest_workdir / "state"), "--control", control,
         "--listen", f"unix:{guest_workdir / 'nbd.sock'}", "--qmp", f"vm={vm.qmp_path}",
         "--scratch-limit", str(1 * MiB)],
        control, guest_workdir / "daemon.log",
    )  # fmt: skip
    daemon.start()
    try:
        vm.write(0, 0x11, 0, 8 * MiB)
        session = daemon.json("backup", "begin", "vm", "--no-checkpoint")
        for offset in range(0, 8 * MiB, 1 * MiB):
            vm.write(0, 0x22, offset, 1 * MiB)  # raises if the guest's write fails
        wait_for(lambda: daemon.json("backup", "list", "vm")[0]["state"] == "failed", "break")
        assert "--scratch-limit" in daemon.json("backup", "list", "vm")[0]["error"]
        wait_for(lambda: qemu_leftovers(vm.qmp) == [], "the filters to leave the path")
        wait_for(lambda: not list((guest_workdir / "state").rglob("*.qcow2")), "scratch freed")
        vm.write(0, 0x33, 0, 1 * MiB)
        daemon.json("backup", "end", "vm", session["id"])
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        vm.stop()
