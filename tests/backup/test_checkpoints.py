"""Chain rules of nbdsrv.backup.checkpoints, on hand-made QEMU states."""

from dataclasses import dataclass, field, replace

import pytest

from nbdsrv.backends.qmp.bitmap_actions import create_actions, delete_actions
from nbdsrv.backup.checkpoints import (
    Checkpoint,
    CheckpointChain,
    CheckpointError,
    Segment,
    assess,
    check_granularity,
    check_name,
    count_problem,
    merged_parent,
    observed_counts,
)
from nbdsrv.errors import NotFoundError


@dataclass(frozen=True)
class Bitmap:
    name: str
    recording: bool = False
    persistent: bool = True
    inconsistent: bool = False
    granularity: int = 65536
    count: int = 0


@dataclass
class Layer:
    node_name: str
    filename: str
    format: str = "qcow2"
    virtual_size: int = 1 << 30
    read_only: bool = False
    bitmaps: dict[str, Bitmap] = field(default_factory=dict)
    persistent_bitmaps: bool = True

    def bitmap(self, name: str) -> Bitmap | None:
        return self.bitmaps.get(name)


def layer(*bitmaps: Bitmap, file: str = "/d/a.qcow2", node: str = "n0") -> Layer:
    return Layer(node, file, bitmaps={b.name: b for b in bitmaps})


def ckpt(name: str, parent: str | None, file: str = "/d/a.qcow2") -> Checkpoint:
    return Checkpoint(
        name, parent, "2026-01-01T00:00:00Z", 65536, {"disk0": (Segment(file, name),)}
    )


CHAIN = CheckpointChain([ckpt("c1", None), ckpt("c2", "c1"), ckpt("c3", "c2")])
HEALTHY = {"disk0": [layer(Bitmap("c1"), Bitmap("c2"), Bitmap("c3", recording=True))]}


def test_healthy_chain_is_valid_everywhere() -> None:
    assert assess(CHAIN, HEALTHY) == {"c1": None, "c2": None, "c3": None}


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (Bitmap("c2", inconsistent=True), "inconsistent"),
        (Bitmap("c2", persistent=False), "not persistent"),
    ],
)
def test_broken_bitmap_invalidates_itself_and_older(broken: Bitmap, reason: str) -> None:
    state = {"disk0": [layer(Bitmap("c1"), broken, Bitmap("c3", recording=True))]}
    result = assess(CHAIN, state)
    assert result["c3"] is None
    assert reason in (result["c2"] or "")
    assert result["c1"] == "later checkpoint 'c2' is invalid"


def test_missing_bitmap_is_named_in_the_reason() -> None:
    state = {"disk0": [layer(Bitmap("c1"), Bitmap("c3", recording=True))]}
    assert assess(CHAIN, state)["c2"] == "bitmap 'c2' is missing on disk disk0 (/d/a.qcow2)"


def test_newest_checkpoint_must_record() -> None:
    state = {"disk0": [layer(Bitmap("c1"), Bitmap("c2"), Bitmap("c3"))]}
    assert "stopped recording" in (assess(CHAIN, state)["c3"] or "")


def test_sticky_invalid_reason_survives_a_healthy_looking_qemu() -> None:
    chain = CheckpointChain(
        [ckpt("c1", None), Checkpoint(**{**ckpt("c2", "c1").__dict__, "invalid": "lost"})]
    )
    state = {"disk0": [layer(Bitmap("c1"), Bitmap("c2", recording=True))]}
    assert assess(chain, state) == {"c1": "later checkpoint 'c2' is invalid", "c2": "lost"}


def test_layer_gone_from_chain_is_reported() -> None:
    state = {"disk0": [layer(Bitmap("c3", recording=True), file="/d/other.qcow2")]}
    assert "no longer in the backing chain" in (assess(CHAIN, state)["c1"] or "")


def test_create_disables_recording_bitmap_and_adds_new_one_in_one_transaction() -> None:
    checkpoint, actions = create_actions(CHAIN, HEALTHY, "c4", 65536)
    assert checkpoint.parent == "c3"
    assert checkpoint.disks == {"disk0": (Segment("/d/a.qcow2", "c4"),)}
    assert actions == [
        ("block-dirty-bitmap-disable", {"node": "n0", "name": "c3"}),
        (
            "block-dirty-bitmap-add",
            {
                "node": "n0",
                "name": "c4",
                "granularity": 65536,
                "persistent": True,
                "disabled": False,
            },
        ),
    ]


def test_create_after_inconsistent_bitmap_starts_new_chain_without_disable() -> None:
    state = {"disk0": [layer(Bitmap("c3", inconsistent=True))]}
    _, actions = create_actions(CHAIN, state, "c4", 65536)
    assert [a for a, _ in actions] == ["block-dirty-bitmap-add"]


def test_create_on_a_disk_that_cannot_store_bitmaps_adds_one_in_memory() -> None:
    raw = Layer("n1", "/d/b.raw", format="raw", persistent_bitmaps=False)
    checkpoint, actions = create_actions(CheckpointChain(), {**HEALTHY, "disk1": [raw]}, "c9", 4096)
    assert checkpoint.disks == {
        "disk0": (Segment("/d/a.qcow2", "c9"),),
        "disk1": (Segment("/d/b.raw", "c9", persistent=False),),
    }
    assert [data["persistent"] for _, data in actions] == [True, False]
    assert not checkpoint.persistent


def test_create_refuses_existing_bitmap_name() -> None:
    with pytest.raises(CheckpointError, match="already has a bitmap named 'c2'"):
        create_actions(CheckpointChain(), HEALTHY, "c2", 65536)


def test_delete_middle_merges_into_parent_then_removes() -> None:
    assert delete_actions(CHAIN, HEALTHY, "c2") == [
        ("block-dirty-bitmap-merge", {"node": "n0", "target": "c1", "bitmaps": ["c2"]}),
        ("block-dirty-bitmap-remove", {"node": "n0", "name": "c2"}),
    ]


def test_delete_recording_reenables_parent() -> None:
    assert delete_actions(CHAIN, HEALTHY, "c3") == [
        ("block-dirty-bitmap-enable", {"node": "n0", "name": "c2"}),
        ("block-dirty-bitmap-merge", {"node": "n0", "target": "c2", "bitmaps": ["c3"]}),
        ("block-dirty-bitmap-remove", {"node": "n0", "name": "c3"}),
    ]


def test_delete_oldest_only_removes() -> None:
    assert delete_actions(CHAIN, HEALTHY, "c1") == [
        ("block-dirty-bitmap-remove", {"node": "n0", "name": "c1"}),
    ]


def test_chain_after_delete_reparents_child() -> None:
    after = merged_parent(CHAIN, "c2")
    assert [(c.name, c.parent) for c in after] == [("c1", None), ("c3", "c1")]


def test_unknown_checkpoint_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="no checkpoint 'zz'"):
        CHAIN.find("zz")


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 129])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(CheckpointError):
        check_name(name)


@pytest.mark.parametrize("granularity", [0, 256, 3000, 1 << 32])
def test_bad_granularity_is_refused(granularity: int) -> None:
    with pytest.raises(CheckpointError):
        check_granularity(granularity)


def test_checkpoint_json_round_trip() -> None:
    assert CheckpointChain.from_json(CHAIN.to_json()).checkpoints == CHAIN.checkpoints


# -- bitmaps changed behind nbdsrv's back ------------------------------------------------------


def test_granularity_other_than_recorded_is_a_problem() -> None:
    state = {"disk0": [layer(Bitmap("c1"), Bitmap("c2"), Bitmap("c3", True, granularity=131072))]}
    reasons = assess(CHAIN, state)
    assert "granularity 131072" in (reasons["c3"] or "")
    assert reasons["c1"] == "later checkpoint 'c3' is invalid"


def test_a_closed_checkpoint_that_records_is_a_problem() -> None:
    state = {"disk0": [layer(Bitmap("c1"), Bitmap("c2", True), Bitmap("c3", True))]}
    reasons = assess(CHAIN, state)
    assert "its checkpoint is closed" in (reasons["c2"] or "")
    assert reasons["c3"] is None


@pytest.mark.parametrize(
    ("seen", "now", "problem"),
    [
        ((4096, True), Bitmap("c3", True, count=8192), None),  # a recording bitmap grows
        ((8192, True), Bitmap("c3", True, count=4096), "lost dirty bits"),
        ((8192, False), Bitmap("c3", False, count=8192), None),  # frozen and unchanged
        ((8192, False), Bitmap("c3", False, count=16384), "frozen bitmap"),
        ((8192, False), Bitmap("c3", False, count=0), "lost dirty bits"),
    ],
)
def test_counts_against_the_last_seen(
    seen: tuple[int, bool], now: Bitmap, problem: str | None
) -> None:
    state = {"disk0": [layer(now)]}
    found = count_problem(ckpt("c3", "c2"), state, {("/d/a.qcow2", "c3"): seen})
    assert (found is None) if problem is None else (problem in (found or ""))


def test_observed_counts_cover_every_segment_qemu_holds() -> None:
    state = {"disk0": [layer(Bitmap("c1", count=5), Bitmap("c3", True, count=7))]}
    assert observed_counts(CHAIN, state) == {
        ("/d/a.qcow2", "c1"): (5, False),
        ("/d/a.qcow2", "c3"): (7, True),
    }


def test_deleting_an_invalid_checkpoint_makes_its_parent_invalid() -> None:
    broken = CHAIN.replaced(replace(CHAIN.find("c2"), invalid="cleared"))
    after = merged_parent(broken, "c2")
    assert after.find("c1").invalid == "merged with invalid checkpoint 'c2': cleared"
    assert after.find("c3").invalid is None
