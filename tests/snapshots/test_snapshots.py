"""External snapshots and commits with checkpoints before, between and after them, against
a real qemu-storage-daemon; correctness by content."""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.qemu.chain import image_in_json
from tests.harness.checksums import sha256
from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import COPY_SCRIPT, ExternalQSD, K, MiB, blocks
from tests.harness.tools import require_tool


def layers(vm: ExternalQSD) -> list[str]:
    """The files of disk0's chain, top first, as QEMU holds it."""
    assert vm.qmp is not None
    nodes = vm.qmp.cmd("query-named-block-nodes", flat=True)
    export = next(e for e in vm.qmp.cmd("query-block-exports") if e["id"] == "disk0")
    by_name = {n["node-name"]: n for n in nodes}
    node = by_name[export["node-name"]]
    if node["drv"] == "throttle":  # the passthrough node under the export
        top = image_in_json(node["file"])
        node = next(n for n in nodes if n["drv"] == "qcow2" and n["file"] == top)
    out = []
    while node is not None:
        out.append(node["file"])
        backing = node["image"].get("full-backing-filename")
        node = next(
            (n for n in nodes if n["drv"] == "qcow2" and n["file"] == backing), None
        ) if backing else None  # fmt: skip
    return out


def full_backup(nbdsrv: DaemonProcess, name: str, target: Path) -> None:
    session = nbdsrv.json("backup", "begin", "vm1", "--checkpoint", name)
    subprocess.run(
        [require_tool("nbdcopy"), nbdsrv.uri("vm1/disk0"), str(target)], check=True, timeout=120
    )
    nbdsrv.cli("backup", "end", "vm1", session["id"])


def incremental(nbdsrv: DaemonProcess, since: str, name: str | None, target: Path) -> list[Any]:
    args = ["--checkpoint", name] if name else ["--no-checkpoint"]
    session = nbdsrv.json("backup", "begin", "vm1", "--from", since, *args)
    try:
        out = subprocess.run(
            ["/usr/bin/python3", str(COPY_SCRIPT), nbdsrv.uri("vm1/disk0"),
             f"qemu:dirty-bitmap:{since}", str(target)],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
    finally:
        nbdsrv.cli("backup", "end", "vm1", session["id"])
    return list(json.loads(out))


def snapshot(nbdsrv: DaemonProcess) -> str:
    return str(nbdsrv.json("snapshot", "create", "vm1")["overlays"]["disk0"])


def all_valid(nbdsrv: DaemonProcess) -> bool:
    return all(c["valid"] for c in nbdsrv.checkpoints())


def test_checkpoints_stay_exact_across_three_layers(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    image = workdir / "backup.raw"
    vm.write(0, 0x10, 0, 1 * MiB)
    full_backup(nbdsrv, "c1", image)  # checkpoint before any snapshot
    vm.write(0, 0x11, 2 * MiB, 64 * K)
    overlay1 = snapshot(nbdsrv)
    assert layers(vm) == [overlay1, str(vm.images[0])]
    vm.write(0, 0x12, 3 * MiB, 64 * K)
    assert all_valid(nbdsrv)
    # Between snapshots: an incremental reads writes from both layers.
    dirty = incremental(nbdsrv, "c1", "c2", image)
    assert blocks(dirty) == blocks([(2 * MiB, 64 * K), (3 * MiB, 64 * K)])
    assert sha256(image.read_bytes()) == sha256(vm.models[0])
    vm.write(0, 0x13, 4 * MiB, 64 * K)
    overlay2 = snapshot(nbdsrv)
    assert layers(vm) == [overlay2, overlay1, str(vm.images[0])]
    vm.write(0, 0x14, 5 * MiB, 64 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c3")  # after the snapshots
    vm.write(0, 0x15, 6 * MiB, 64 * K)
    assert all_valid(nbdsrv)
    since_c1 = incremental(nbdsrv, "c1", None, workdir / "scratch.raw")
    assert blocks(since_c1) == {b for b in range(32, 97, 16)}  # 2..6 MiB at 64 KiB blocks
    dirty = incremental(nbdsrv, "c2", "c4", image)
    assert blocks(dirty) == blocks([(4 * MiB, 64 * K), (5 * MiB, 64 * K), (6 * MiB, 64 * K)])
    assert sha256(image.read_bytes()) == sha256(vm.models[0])


def test_commit_in_the_middle_of_a_chain_of_checkpoints(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    image = workdir / "backup.raw"
    full_backup(nbdsrv, "c1", image)
    vm.write(0, 0x21, 1 * MiB, 64 * K)
    overlay = snapshot(nbdsrv)
    vm.write(0, 0x22, 2 * MiB, 64 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.write(0, 0x23, 3 * MiB, 64 * K)
    committed = nbdsrv.json("snapshot", "commit", "vm1")
    assert committed["committed"] == {"disk0": overlay}
    assert not os.path.exists(overlay)  # nbdsrv made it, so nbdsrv removes it
    assert layers(vm) == [str(vm.images[0])]
    vm.write(0, 0x24, 4 * MiB, 64 * K)
    assert all_valid(nbdsrv)
    since_c2 = incremental(nbdsrv, "c2", None, workdir / "scratch.raw")
    assert blocks(since_c2) == blocks([(3 * MiB, 64 * K), (4 * MiB, 64 * K)])
    dirty = incremental(nbdsrv, "c1", "c3", image)
    assert blocks(dirty) == {16, 32, 48, 64}
    assert sha256(image.read_bytes()) == sha256(vm.models[0])
    listed = {c["name"]: c for c in nbdsrv.checkpoints()}
    assert set(listed) == {"c1", "c2", "c3"}


def test_delete_checkpoint_whose_bitmap_spans_layers(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x31, 1 * MiB, 64 * K)
    snapshot(nbdsrv)
    vm.write(0, 0x32, 2 * MiB, 64 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.write(0, 0x33, 3 * MiB, 64 * K)
    # c1 lives on the read-only base and on the overlay.
    assert nbdsrv.cli("checkpoint", "delete", "vm1", "c1").returncode == 0
    assert vm.qmp is not None
    for node in vm.qmp.cmd("query-named-block-nodes", flat=True):
        names = {b.get("name") for b in node.get("dirty-bitmaps", [])}
        assert "c1" not in names
    base = next(
        n for n in vm.qmp.cmd("query-named-block-nodes", flat=True) if n["node-name"] == "disk0"
    )
    assert base["ro"] is True  # back to read-only after the change
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c2"]
    assert all_valid(nbdsrv)
    dirty = incremental(nbdsrv, "c2", None, workdir / "scratch.raw")
    assert blocks(dirty) == {48}


def test_overlay_added_behind_our_back_invalidates_checkpoints(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    overlay = workdir / "foreign.qcow2"
    subprocess.run(
        [require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
         str(vm.images[0]), str(overlay)],
        check=True,
    )  # fmt: skip
    assert vm.qmp is not None
    vm.qmp.cmd(
        "blockdev-add", driver="qcow2", **{"node-name": "foreign"},
        file={"driver": "file", "filename": str(overlay)}, backing=None,
    )  # fmt: skip
    vm.qmp.cmd("blockdev-snapshot", node="disk0", overlay="foreign")
    listed = nbdsrv.checkpoints()
    assert listed[0]["valid"] is False
    assert str(overlay) in listed[0]["reason"]
    assert "cannot be used" in nbdsrv.error("backup", "begin", "vm1", "--from", "c1")


def test_snapshot_refused_during_a_backup_session(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    session = nbdsrv.json("backup", "begin", "vm1")
    assert "backup session running" in nbdsrv.error("snapshot", "create", "vm1")
    nbdsrv.cli("backup", "end", "vm1", session["id"])
    assert "no snapshot to commit" in nbdsrv.error("snapshot", "commit", "vm1")


@pytest.mark.parametrize(
    ("fault", "done"),
    [
        ("snapshot-create:after-intent", False),
        ("snapshot-create:after-transaction", True),
        ("snapshot-create:after-commit", True),
    ],
)
def test_killed_during_snapshot_create_restarts_consistent(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path, fault: str, done: bool
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x41, 1 * MiB, 64 * K)
    nbdsrv.stop()
    nbdsrv.start(fault=fault)
    assert nbdsrv.cli("snapshot", "create", "vm1").returncode == 1
    nbdsrv.wait_killed()
    nbdsrv.start()
    assert len(layers(vm)) == (2 if done else 1)
    leftovers = [p for p in os.listdir(workdir) if ".snap-" in p]
    assert len(leftovers) == (1 if done else 0)
    assert all_valid(nbdsrv)
    vm.write(0, 0x42, 2 * MiB, 64 * K)
    dirty = incremental(nbdsrv, "c1", None, workdir / "scratch.raw")
    assert blocks(dirty) == {16, 32}


@pytest.mark.parametrize(
    ("fault", "done"),
    [
        ("snapshot-commit:after-intent", False),
        ("snapshot-commit:after-ready", False),
        ("snapshot-commit:after-merge", False),
        ("snapshot-commit:after-complete", True),
        ("snapshot-commit:after-commit", True),
    ],
)
def test_killed_during_snapshot_commit_restarts_consistent(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path, fault: str, done: bool
) -> None:
    image = workdir / "backup.raw"
    full_backup(nbdsrv, "c1", image)
    vm.write(0, 0x51, 1 * MiB, 64 * K)
    overlay = snapshot(nbdsrv)
    vm.write(0, 0x52, 2 * MiB, 64 * K)
    nbdsrv.stop()
    nbdsrv.start(fault=fault)
    assert nbdsrv.cli("snapshot", "commit", "vm1").returncode == 1
    nbdsrv.wait_killed()
    nbdsrv.start()
    assert vm.qmp is not None
    assert vm.qmp.cmd("query-block-jobs") == []
    assert layers(vm) == ([str(vm.images[0])] if done else [overlay, str(vm.images[0])])
    assert os.path.exists(overlay) is (not done)
    assert all_valid(nbdsrv)
    vm.write(0, 0x53, 3 * MiB, 64 * K)
    dirty = incremental(nbdsrv, "c1", "c2", image)
    assert blocks(dirty) == {16, 32, 48}
    assert sha256(image.read_bytes()) == sha256(vm.models[0])
