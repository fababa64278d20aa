"""A VM-like QEMU (q35 held at -S with no guest; a `-drive if=none,id=drive0` behind a
virtio-blk-pci device; writes driven through a second QMP monitor as a guest's would go
through the device) attached with --qmp: nbdsrv starts its own NBD server in it, and
checkpoints, sessions and snapshots work on a named drive. A drive with no device is
refused: nbdsrv cannot put its copy-before-write filter into its path."""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess, nbdsrv_argv, qmp_daemon
from tests.harness.qemu_vm import QemuSystem, running_vm
from tests.harness.tools import require_tool, run

K = 1024


class QemuVM(QemuSystem):
    def __init__(
        self, workdir: Path, drive: str = "drive0", size: str = "16M", device: bool = True
    ) -> None:
        self.drive = drive
        self.image = workdir / "d.qcow2"
        run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(self.image), size])
        machine = ["-machine", "q35", "-S"] if device else ["-machine", "none"]
        devices = ["-device", f"virtio-blk-pci,drive={drive},id=vdisk0"] if device else []
        super().__init__(workdir, [
            *machine, "-nodefaults", "-display", "none",
            "-drive", f"if=none,id={drive},file={self.image},format=qcow2,node-name=disk0",
            *devices,
        ])  # fmt: skip

    def write(self, pattern: int, offset: int, length: int) -> None:
        """As the guest writes: through the drive, the device's BlockBackend (it keeps its
        name when nbdsrv puts a filter under it)."""
        self.qemu_io(self.drive, f"write -P {pattern} {offset} {length}")


@pytest.fixture
def qemu_vm() -> Iterator[tuple[QemuVM, Path]]:
    with running_vm(QemuVM, "nbdsrv-v-") as (vm, workdir):
        yield vm, workdir


def test_vm_with_named_drive_backs_up_incrementally(qemu_vm: tuple[QemuVM, Path]) -> None:
    vm, workdir = qemu_vm
    control = str(workdir / "control.sock")
    nbd = workdir / "nbd.sock"
    daemon = qmp_daemon(workdir, vm.qmp_path)
    daemon.start()
    try:
        _backup_snapshot_commit(vm, daemon, control, nbd)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


def _backup_snapshot_commit(vm: QemuVM, daemon: DaemonProcess, control: str, nbd: Path) -> None:
    def cli(*args: str) -> dict:  # type: ignore[type-arg]
        return dict(json.loads(run(nbdsrv_argv(*args, "--control", control, "--json"))))

    assert daemon.status()["vms"][0]["disks"] == ["drive0"]
    vm.write(0x11, 0, 64 * K)
    cli("checkpoint", "create", "vm", "--name", "c1")
    vm.write(0x22, 1024 * K, 64 * K)
    session = cli("backup", "begin", "vm", "--from", "c1", "--checkpoint", "c2")
    assert session["disks"]["drive0"]["export"] == "vm/drive0"
    vm.write(0x33, 1024 * K, 64 * K)  # after the point in time
    uri = f"nbd+unix:///vm/drive0?socket={nbd}"
    out = run([require_tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:c1", uri])
    assert [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1] == [
        (1024 * K, 64 * K)
    ]
    run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x22 1M 64k",
         "-c", "read -P 0x11 0 64k", uri])  # fmt: skip
    run(nbdsrv_argv("backup", "end", "vm", session["id"], "--control", control))
    overlay = cli("snapshot", "create", "vm")["overlays"]["drive0"]
    vm.write(0x44, 2048 * K, 64 * K)
    cli("snapshot", "commit", "vm")
    assert not Path(overlay).exists()
    listed = json.loads(run(nbdsrv_argv("checkpoint", "list", "vm", "--control", control,
                                        "--json")))  # fmt: skip
    assert [(c["name"], c["valid"]) for c in listed] == [("c1", True), ("c2", True)]
    session = cli("backup", "begin", "vm", "--from", "c2", "--no-checkpoint")
    out = run([require_tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:c2", uri])
    assert [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1] == [
        (1024 * K, 64 * K),
        (2048 * K, 64 * K),
    ]
    assert daemon.stop() == 0  # ends the session too
    assert vm.qmp.cmd("query-block-jobs") == []
    assert vm.nbdsrv_nodes() == []


def test_drive_without_device_is_refused(tmp_path: Path) -> None:
    """-machine none -drive if=none: no device to qom-set, so no safe point in time."""
    with running_vm(lambda workdir: QemuVM(workdir, device=False), "nbdsrv-v-") as (vm, workdir):
        control = str(workdir / "control.sock")
        daemon = qmp_daemon(workdir, vm.qmp_path)
        daemon.start()
        try:
            proc = subprocess.run(
                nbdsrv_argv("backup", "begin", "vm", "--no-checkpoint", "--control", control),
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 1
            assert proc.stderr.count("\n") == 1
            assert "has no guest device" in proc.stderr
            assert daemon.status()["sessions"] == []
            assert vm.nbdsrv_nodes() == []
            assert daemon.stop() == 0
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
