"""How a direct export's "since C" bitmaps are planned: the relay's suffix OR, newest first,
at each checkpoint's granularity; offered ones named as their context on the session's
snapshot-access node, the others on the scratch node under names no checkpoint can have."""

import json

from nbdsrv.backends.base import PointInTimeRequest
from nbdsrv.backends.qmp.point_in_time import direct_contexts
from nbdsrv.backup.checkpoints import Checkpoint
from nbdsrv.qemu import fleece

SESSION = "0123456789ab"
SWITCH = fleece.Switch(fleece.SWITCH_QDEV, "/machine/peripheral/vdisk0", "fmt0")


def plan(bitmaps: list[tuple[str, int]], direct: dict[str, str] | None) -> fleece.DiskPlan:
    return fleece.plan_disk(
        SESSION, 0, "vdisk0", "fmt0", 1 << 20, "/tmp", SWITCH,
        [(c, g, [("fmt0", c)]) for c, g in bitmaps], direct,
    )  # fmt: skip


def checkpoint(name: str, granularity: int = 65536) -> Checkpoint:
    return Checkpoint(name=name, parent=None, created="", granularity=granularity, disks={})


def test_since_bitmaps_chain_newest_first_at_each_granularity() -> None:
    disk = plan([("c1", 65536), ("c2", 131072), ("c3", 65536)], {"c1": "c1"})
    scr, acc = disk.scratch_node, disk.access_node
    frozen = {c: (scr, fleece.frozen_bitmap_name(SESSION, c)) for c in ("c1", "c2", "c3")}
    assert disk.direct_contexts == ("c1",)
    since3, since2 = (scr, f"nbdsrv-{SESSION}:since:c3"), (scr, f"nbdsrv-{SESSION}:since:c2")
    assert disk.direct_bitmaps == (
        (*since3, 65536, (frozen["c3"],)),
        (*since2, 131072, (frozen["c2"], since3)),
        (acc, "c1", 65536, (frozen["c1"], since2)),
    )
    [transaction] = fleece.direct_bitmap_commands(disk)
    actions = transaction[1]["actions"]
    assert [a["type"] for a in actions] == [
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-merge",
    ] * 3
    assert all(a["data"]["disabled"] and not a["data"]["persistent"] for a in actions[::2])
    [export] = fleece.direct_export_commands(disk)
    assert export[1]["bitmaps"] == [{"node": acc, "name": "c1"}]
    assert export[1]["node-name"] == acc and export[1]["writable"] is False


def test_bitmap_name_and_all_checkpoints_label_the_contexts() -> None:
    wanted = [checkpoint("c1"), checkpoint("c2"), checkpoint("c3")]
    frozen = {"c1", "c2", "c3"}
    named = PointInTimeRequest(session=SESSION, from_checkpoint="c2", bitmap_name="nm")
    assert direct_contexts(named, wanted[1:], frozen) == {"nm": "c2"}
    every = PointInTimeRequest(session=SESSION, all_checkpoints=True)
    assert direct_contexts(every, wanted, frozen) == {"c1": "c1", "c2": "c2", "c3": "c3"}
    assert direct_contexts(PointInTimeRequest(session=SESSION), [], frozen) == {}


def test_a_context_the_disk_was_not_watched_for_is_left_out() -> None:
    """A disk added after c1 has no c1 bitmap: the relay offers "since c1" all dirty, which
    QEMU cannot build; "since c2" stays."""
    wanted = [checkpoint("c1"), checkpoint("c2")]
    every = PointInTimeRequest(session=SESSION, all_checkpoints=True)
    assert direct_contexts(every, wanted, {"c2"}) == {"c2": "c2"}


def test_records_round_trip_and_old_records_have_no_direct_export() -> None:
    disk = plan([("c1", 65536), ("c2", 65536)], {"b": "c1"})
    record = fleece.FleecePlan(SESSION, "/tmp/s", True, (disk,))

    again = fleece.FleecePlan.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    old = record.to_json()
    for d in old["disks"]:
        del d["direct_export"], d["direct_contexts"], d["direct_bitmaps"]
    assert fleece.FleecePlan.from_json(old).disks[0].direct_export == ""
    assert fleece.direct_export_commands(fleece.FleecePlan.from_json(old).disks[0]) == []
