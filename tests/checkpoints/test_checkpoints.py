"""Checkpoints against a real qemu-storage-daemon, through the CLI as users run it."""

import json
import subprocess
import time

import pytest
from qemu.qmp import ExecuteError

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, MiB

K = 1024


def bitmap_extents(vm: ExternalQSD, names: list[str], disk: int = 0) -> list[tuple[int, int]]:
    """Dirty (offset, length) runs of the OR of ``names``, read through a QEMU export of a
    frozen merge — what QEMU itself would hand a backup tool."""
    assert vm.qmp is not None
    node = f"disk{disk}"
    vm.qmp.cmd("block-dirty-bitmap-add", node=node, name="probe", disabled=True)
    try:
        vm.qmp.cmd("block-dirty-bitmap-merge", node=node, target="probe", bitmaps=names)
        vm.qmp.cmd(
            "block-export-add",
            type="nbd",
            id="probe",
            **{"node-name": node},
            name="probe",
            bitmaps=["probe"],
        )
        try:
            out = subprocess.run(
                [
                    "nbdinfo",
                    "--json",
                    "--map=qemu:dirty-bitmap:probe",
                    f"nbd+unix:///probe?socket={vm.nbd_path}",
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        finally:
            vm.qmp.cmd("block-export-del", id="probe")
    finally:
        for _ in range(100):
            try:
                vm.qmp.cmd("block-dirty-bitmap-remove", node=node, name="probe")
                break
            except ExecuteError:  # busy until the export is really gone
                time.sleep(0.05)
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]


def test_create_records_exactly_the_writes_after_it(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    vm.write(0, 0x11, 0, 64 * K)  # before any checkpoint: in no bitmap
    created = nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    assert created["name"] == "c1" and created["parent"] is None and created["created"]
    vm.write(0, 0x22, 1 * MiB, 128 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.write(0, 0x33, 4 * MiB, 64 * K)
    assert vm.qmp is not None
    bitmaps = vm.qmp.bitmaps("disk0")
    assert (bitmaps["c1"]["count"], bitmaps["c1"]["recording"]) == (128 * K, False)
    assert (bitmaps["c2"]["count"], bitmaps["c2"]["recording"]) == (64 * K, True)
    assert all(b["persistent"] for b in bitmaps.values())
    assert bitmap_extents(vm, ["c1", "c2"]) == [(1 * MiB, 128 * K), (4 * MiB, 64 * K)]
    assert [(c["name"], c["parent"], c["valid"]) for c in nbdsrv.checkpoints()] == [
        ("c1", None, True),
        ("c2", "c1", True),
    ]


def test_delete_middle_keeps_since_parent_exact(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    for i, name in enumerate(["c1", "c2", "c3"]):
        nbdsrv.json("checkpoint", "create", "vm1", "--name", name)
        vm.write(0, 0x40 + i, i * MiB, 64 * K)
    assert nbdsrv.cli("checkpoint", "delete", "vm1", "c2").returncode == 0
    assert vm.qmp is not None
    assert set(vm.qmp.bitmaps("disk0")) == {"c1", "c3"}
    assert bitmap_extents(vm, ["c1"]) == [(0, 64 * K), (1 * MiB, 64 * K)]
    assert [(c["name"], c["parent"]) for c in nbdsrv.checkpoints()] == [("c1", None), ("c3", "c1")]


def test_delete_newest_reenables_parent(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.write(0, 0x11, 0, 64 * K)
    assert nbdsrv.cli("checkpoint", "delete", "vm1", "c2").returncode == 0
    vm.write(0, 0x22, 2 * MiB, 64 * K)
    assert vm.qmp is not None
    c1 = vm.qmp.bitmaps("disk0")["c1"]
    assert (c1["recording"], c1["count"]) == (True, 128 * K)
    assert nbdsrv.checkpoints()[0]["valid"] is True


@pytest.mark.parametrize("vm", [("qcow2", "qcow2")], indirect=True)
def test_two_disks_get_one_checkpoint(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(1, 0x11, 0, 64 * K)
    assert vm.qmp is not None
    assert vm.qmp.bitmaps("disk0")["c1"]["count"] == 0
    assert vm.qmp.bitmaps("disk1")["c1"]["count"] == 64 * K
    assert nbdsrv.checkpoints()[0]["disks"] == ["disk0", "disk1"]


@pytest.mark.parametrize("vm", [("qcow2", "raw", "qcow2v2")], indirect=True)
def test_disks_that_cannot_store_bitmaps_get_them_in_memory(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(1, 0x11, 0, 64 * K)
    vm.write(2, 0x22, 1 * MiB, 64 * K)
    assert vm.qmp is not None
    persistent = [vm.qmp.bitmaps(f"disk{i}")["c1"]["persistent"] for i in range(3)]
    assert persistent == [True, False, False]
    assert [vm.qmp.bitmaps(f"disk{i}")["c1"]["count"] for i in range(3)] == [0, 64 * K, 64 * K]
    [listed] = nbdsrv.checkpoints()
    assert (listed["valid"], listed["persistent"]) == (True, False)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    assert nbdsrv.cli("checkpoint", "delete", "vm1", "c1").returncode == 0
    assert [(c["name"], c["valid"]) for c in nbdsrv.checkpoints()] == [("c2", True)]


def test_qcow2_checkpoints_are_persistent(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    assert [(c["name"], c["persistent"]) for c in nbdsrv.checkpoints()] == [("c1", True)]


def test_clear_errors_for_bad_requests(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    assert nbdsrv.error("checkpoint", "create", "vm1", "--name", "c1") == (
        "VM vm1 already has a checkpoint 'c1'"
    )
    assert nbdsrv.error("checkpoint", "create", "nope") == "no VM named 'nope'"
    assert nbdsrv.error("checkpoint", "delete", "vm1", "zz") == "no checkpoint 'zz'"
    assert "bad checkpoint name" in nbdsrv.error("checkpoint", "create", "vm1", "--name", "a/b")
    assert "bad granularity" in nbdsrv.error("checkpoint", "create", "vm1", "--granularity", "1000")
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c1"]


def test_granularity_is_applied(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1", "--granularity", "4096")
    assert vm.qmp is not None
    assert vm.qmp.bitmaps("disk0")["c1"]["granularity"] == 4096
    assert nbdsrv.checkpoints()[0]["granularity"] == 4096
