"""Disk names of a `--qmp` VM with a modern command line (docs/reference.md "Disk names"): a disk
attached as `-blockdev … -device virtio-blk-pci,drive=NODE,id=vdisk0` is `vdisk0` (query-block
reports the QOM path `/machine/peripheral/vdisk0/virtio-backend`), a `scsi-hd` is its id, a
device without id falls back to its root node name, and a backup of each works.

The QEMU has no guest (`-S`); writes go through the devices' own BlockBackends with HMP
`qemu-io -d`, as a guest's would."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdsrv.qemu.chain import disks_from
from tests.harness.daemon import DaemonProcess, nbdsrv_argv
from tests.harness.qemu_vm import QemuSystem, running_vm
from tests.harness.tools import require_tool, run

K = 1024
# The disks nbdsrv must see: two device ids and, for the device without id, its node name.
DISKS = ("vdisk0", "scsi0-0-0-0", "n2")


def _node(name: str, filename: str) -> dict[str, object]:
    return {"node-name": name, "drv": "qcow2", "file": filename, "image": {"virtual-size": 1}}


@pytest.mark.parametrize(
    ("device", "qdev", "expected"),
    [
        ("", "/machine/peripheral/vdisk0/virtio-backend", "vdisk0"),
        ("", "scsi0-0-0-0", "scsi0-0-0-0"),
        ("", "/machine/peripheral-anon/device[0]/virtio-backend", "n0"),
        (
            "drive-virtio-disk0",
            "/machine/peripheral/virtio-disk0/virtio-backend",
            "drive-virtio-disk0",
        ),
        ("", "", "n0"),
    ],
)
def test_disk_name_from_query_block(device: str, qdev: str, expected: str) -> None:
    block = [{"device": device, "qdev": qdev, "inserted": {"node-name": "n0"}}]
    disks = disks_from(block, [_node("n0", "/img/a.qcow2")])
    assert [d.id for d in disks] == [expected]
    assert disks_from(block, [_node("n0", "/img/a.qcow2")], [expected])[0].id == expected


class BlockdevVM(QemuSystem):
    """qemu-system-x86_64 -S with three -blockdev disks on guest devices."""

    def __init__(self, workdir: Path) -> None:
        img = require_tool("qemu-img")
        argv = ["-machine", "q35", "-accel", "tcg", "-S", "-nodefaults", "-display", "none"]
        for i in range(3):
            run([img, "create", "-q", "-f", "qcow2", str(workdir / f"d{i}.qcow2"), "16M"])
            argv += [
                "-blockdev", f"driver=file,filename={workdir / f'd{i}.qcow2'},node-name=f{i}",
                "-blockdev", f"driver=qcow2,file=f{i},node-name=n{i}",
            ]  # fmt: skip
        argv += [
            "-device", "virtio-blk-pci,drive=n0,id=vdisk0",
            "-device", "virtio-scsi-pci,id=scsi0",
            "-device", "scsi-hd,drive=n1,id=scsi0-0-0-0",
            "-device", "virtio-blk-pci,drive=n2",  # no id
        ]  # fmt: skip
        super().__init__(workdir, argv)
        # Root node → what HMP qemu-io -d takes: query-block's qdev (an id or a QOM path).
        by_node = {b["inserted"]["node-name"]: b["qdev"] for b in self.qmp.cmd("query-block")}
        self.backends = dict(zip(DISKS, (by_node[f"n{i}"] for i in range(3)), strict=True))
        assert self.backends["vdisk0"] == "/machine/peripheral/vdisk0/virtio-backend"

    def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        self.qemu_io(f"-d {self.backends[disk]}", f"write -P {pattern} {offset} {length}")


@pytest.fixture
def blockdev_vm() -> Iterator[tuple[BlockdevVM, Path]]:
    with running_vm(BlockdevVM, "nbdsrv-n-") as (vm, workdir):
        yield vm, workdir


def test_device_ids_name_blockdev_disks_and_back_up(
    blockdev_vm: tuple[BlockdevVM, Path],
) -> None:
    vm, workdir = blockdev_vm
    control = str(workdir / "control.sock")
    nbd = workdir / "nbd.sock"
    daemon = DaemonProcess(
        ["--state-dir", str(workdir / "state"), "--listen", f"unix:{nbd}",
         "--qmp", f"vm={vm.qmp_path}"],
        control, workdir / "daemon.log",
    )  # fmt: skip
    daemon.start()

    def cli(*args: str) -> dict:  # type: ignore[type-arg]
        return dict(json.loads(run(nbdsrv_argv(*args, "--control", control, "--json"))))

    try:
        assert sorted(daemon.status()["vms"][0]["disks"]) == sorted(DISKS)
        for i, disk in enumerate(DISKS):
            vm.write(disk, 0x11 + i, 0, 64 * K)
        cli("checkpoint", "create", "vm", "--name", "c1")
        for i, disk in enumerate(DISKS):
            vm.write(disk, 0x21 + i, (1 + i) * 1024 * K, 64 * K)
        session = cli("backup", "begin", "vm", "--from", "c1", "--checkpoint", "c2")
        assert {d: session["disks"][d]["export"] for d in DISKS} == {d: f"vm/{d}" for d in DISKS}
        for i, disk in enumerate(DISKS):
            vm.write(disk, 0x31 + i, (1 + i) * 1024 * K, 64 * K)  # after the point in time
        for i, disk in enumerate(DISKS):
            uri = f"nbd+unix:///vm/{disk}?socket={nbd}"
            out = run([require_tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:c1", uri])
            dirty = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]
            assert dirty == [((1 + i) * 1024 * K, 64 * K)], disk
            run([require_tool("qemu-io"), "-r", "-f", "raw",
                 "-c", f"read -P {0x11 + i} 0 64k",
                 "-c", f"read -P {0x21 + i} {(1 + i) * 1024}k 64k", uri])  # fmt: skip
        run(nbdsrv_argv("backup", "end", "vm", session["id"], "--control", control))
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()
