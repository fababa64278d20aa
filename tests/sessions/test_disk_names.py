"""Any disk id, any disk size: a VM-like QEMU whose drive has libvirt's older id
(`drive-virtio-disk0`) or an id far longer than QEMU's 31-character node names, and a disk
whose size is not a multiple of the bitmap granularity. Full and incremental backups,
snapshots and commits work, and every point in time rebuilds by checksum."""

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess, nbdsrv_argv, qmp_daemon
from tests.harness.dirs import short_tmp_dir
from tests.harness.timeline import Timeline
from tests.harness.tools import run
from tests.sessions.test_qemu_vm import QemuVM

K = 1024
MiB = 1024 * K
LONG_ID = "drive-" + "scsi0-0-0-0-with-a-very-long-libvirt-alias-" * 2


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmp_dir("nbdsrv-n-") as path:
        yield path


def start(workdir: Path, drive: str, size: int) -> tuple[QemuVM, DaemonProcess, Timeline]:
    vm = QemuVM(workdir, drive=drive, size=str(size))
    control = str(workdir / "control.sock")
    nbd = workdir / "nbd.sock"
    daemon = qmp_daemon(workdir, vm.qmp_path)
    daemon.start()

    def cli(*args: str) -> object:
        return json.loads(run(nbdsrv_argv(*args, "--control", control, "--json")))

    timeline = Timeline(
        cli, lambda export: f"nbd+unix:///{export}?socket={nbd}", "vm", drive, workdir, size
    )
    return vm, daemon, timeline


def stop(vm: QemuVM, daemon: DaemonProcess) -> None:
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.kill()
    try:
        vm.stop()
    except Exception:
        subprocess.run(["kill", f"-{signal.SIGKILL}", vm.pidfile.read_text().strip()], check=False)


@pytest.mark.parametrize("drive", ["drive-virtio-disk0", LONG_ID])
def test_long_disk_ids(workdir: Path, drive: str) -> None:
    vm, daemon, timeline = start(workdir, drive, 16 * MiB)
    try:
        assert daemon.status()["vms"][0]["disks"] == [drive]

        def write(pattern: int, offset: int) -> None:
            vm.write(pattern, offset, 64 * K)
            timeline.wrote(offset, 64 * K, pattern)

        write(0x11, 0)
        timeline.full("c0")
        write(0x12, 1 * MiB)
        timeline.cli("snapshot", "create", "vm")
        write(0x13, 2 * MiB)
        timeline.checkpoint("c1")
        write(0x14, 3 * MiB)
        timeline.verify("on the overlay")
        timeline.cli("snapshot", "commit", "vm")
        write(0x15, 4 * MiB)
        timeline.verify("after the commit")
        assert daemon.stop() == 0
    finally:
        stop(vm, daemon)


def test_odd_sized_disk_with_a_gpt_backup_header(workdir: Path) -> None:
    """The last 64 KiB granule is 1536 bytes long; a GPT backup header at the very end is
    written before every backup. QEMU counts whole granules in a bitmap's count."""
    size = 16 * MiB + 1536
    vm, daemon, timeline = start(workdir, "drive0", size)
    try:

        def write(pattern: int, offset: int, length: int) -> None:
            vm.write(pattern, offset, length)
            timeline.wrote(offset, length, pattern)

        write(0x21, size - 512, 512)
        timeline.full("c0")
        for i in range(3):
            write(0x30 + i, size - 512, 512)  # the backup GPT header
            write(0x40 + i, size - 1536, 512)
            write(0x50 + i, i * MiB, 4 * K)
            timeline.checkpoint(f"c{i + 1}")
            timeline.verify(f"round {i}")
        assert daemon.stop() == 0
    finally:
        stop(vm, daemon)
