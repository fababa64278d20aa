"""Checkpoints with bitmaps in QEMU's memory (nbdsrv.backup.in_memory), on hand-made states."""

from dataclasses import replace

from nbdsrv.backup.checkpoints import Checkpoint, CheckpointChain, Segment, assess, merged_parent
from nbdsrv.backup.in_memory import restart_problem
from nbdsrv.qemu.chain import _stores_bitmaps, disks_from
from nbdsrv.qemu.errors import QMPError
from nbdsrv.qemu.process_marker import markers_of
from tests.backup.test_checkpoints import Bitmap, Layer

MIXED = Checkpoint(
    "c1",
    None,
    "2026-01-01T00:00:00Z",
    65536,
    {
        "disk0": (Segment("/d/a.raw", "c1", persistent=False),),
        "disk1": (Segment("/d/b.qcow2", "c1"),),
    },
    process="nbdsrv-qemu-1",
)


def test_json_keeps_persistence_and_process() -> None:
    chain = CheckpointChain([MIXED])
    document = chain.to_json()
    assert document[0]["disks"]["disk0"] == [
        {"file": "/d/a.raw", "bitmap": "c1", "persistent": False}
    ]
    assert document[0]["disks"]["disk1"] == [{"file": "/d/b.qcow2", "bitmap": "c1"}]
    assert CheckpointChain.from_json(document).checkpoints == [MIXED]


def test_a_new_process_invalidates_in_memory_checkpoints_only() -> None:
    assert restart_problem(MIXED, frozenset({"nbdsrv-qemu-1", "nbdsrv-qemu-2"})) is None
    assert restart_problem(MIXED, None) is None  # not looked at yet
    reason = restart_problem(MIXED, frozenset({"nbdsrv-qemu-2"}))
    assert reason is not None
    assert "QEMU was restarted" in reason and "disk0 (/d/a.raw)" in reason
    assert "disk1" not in reason
    persistent = replace(MIXED, disks={"disk1": MIXED.disks["disk1"]}, process=None)
    assert persistent.persistent
    assert restart_problem(persistent, frozenset({"nbdsrv-qemu-2"})) is None


def test_in_memory_bitmap_is_expected_not_persistent() -> None:
    state = {
        "disk0": [Layer("n0", "/d/a.raw", "raw", persistent_bitmaps=False,
                        bitmaps={"c1": Bitmap("c1", recording=True, persistent=False)})],
        "disk1": [Layer("n1", "/d/b.qcow2",
                        bitmaps={"c1": Bitmap("c1", recording=True, persistent=False)})],
    }  # fmt: skip
    # On the raw disk that is as planned; on the qcow2 disk someone replaced the bitmap.
    assert "disk disk1" in (assess(CheckpointChain([MIXED]), state)["c1"] or "")


def test_delete_carries_in_memory_segments_and_process_to_the_parent() -> None:
    parent = Checkpoint("c0", None, "t", 65536, {"disk1": (Segment("/d/b.qcow2", "c0"),)})
    chain = CheckpointChain([parent, replace(MIXED, parent="c0")])
    merged = merged_parent(chain, "c1").find("c0")
    assert merged.disks["disk0"] == (Segment("/d/a.raw", "c0", persistent=False),)
    assert merged.process == "nbdsrv-qemu-1" and not merged.persistent


def test_markers_are_found_among_objects() -> None:
    answer = [{"name": "type"}, {"name": "nbdsrv-qemu-ab"}, {"name": "other"}]
    assert markers_of(answer) == frozenset({"nbdsrv-qemu-ab"})
    assert markers_of(QMPError("qom-list", "Device '/objects' not found")) == frozenset()


def test_which_images_store_bitmaps() -> None:
    def node(drv: str, compat: str | None = None) -> dict[str, object]:
        data = {"compat": compat} if compat else {}
        return {"drv": drv, "image": {"format-specific": {"type": drv, "data": data}}}

    assert _stores_bitmaps(node("qcow2", "1.1"))
    assert not _stores_bitmaps(node("qcow2", "0.10"))
    assert not _stores_bitmaps(node("raw"))
    assert not _stores_bitmaps(node("host_device"))


def test_a_device_node_with_no_format_node_is_a_disk_and_a_backing_layer() -> None:
    device = {"node-name": "blk", "drv": "host_device", "file": "/dev/loop7",
              "image": {"virtual-size": 1 << 20}}  # fmt: skip
    block = [{"device": "", "qdev": "/machine/peripheral/vblk/virtio-backend",
              "inserted": {"node-name": "blk"}}]  # fmt: skip
    [disk] = disks_from(block, [device])
    assert disk.id == "vblk"
    assert [(layer.node_name, layer.persistent_bitmaps) for layer in disk.layers] == [
        ("blk", False)
    ]
    image = {"virtual-size": 1 << 20, "backing-filename-format": "raw",
             "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}  # fmt: skip
    overlay = {"node-name": "ov", "drv": "qcow2", "file": "/s/ov.qcow2",
               "backing_file": "/dev/loop7", "image": image}  # fmt: skip
    overlay_file = {"node-name": "ovf", "drv": "file", "file": "/s/ov.qcow2"}
    block[0]["inserted"] = {"node-name": "ov"}
    [disk] = disks_from(block, [overlay, overlay_file, device])
    assert [(layer.node_name, layer.persistent_bitmaps) for layer in disk.layers] == [
        ("ov", True),
        ("blk", False),
    ]
