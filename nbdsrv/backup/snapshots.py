"""External snapshots and commits that keep every checkpoint exact (pure rules).

A checkpoint's bitmap follows the disk up and down its backing chain as *segments*::

    before:   base.qcow2 [c1 c2●]                         ● recording
    snapshot: base.qcow2 [c1 c2] ◄── snap1.qcow2 [c2●]     c2 = base:c2 | snap1:c2
    c3:       base.qcow2 [c1 c2] ◄── snap1.qcow2 [c2 c3●]
    commit:   base.qcow2 [c1 c2 c3●]                        snap1's segments merged down

- snapshot create: one transaction over all disks — disable the recording bitmap on the old
  top, ``blockdev-snapshot`` onto the new overlay, add the recording bitmap (same name, same
  granularity, persistent) in the overlay. The recording checkpoint gains a segment.
- snapshot commit: active ``block-commit`` of the top into the layer directly below it
  (``top-node`` and ``base-node`` given: without them QEMU commits into the bottom of the
  chain, rewriting a base that may be a shared template); once the job is
  ready, one transaction merges every segment of the top into the base (adding the base's
  bitmap where it lacks one) and enables the base's copy of the recording bitmap; then the
  job completes. Writes that land while the job runs are in the top's recording bitmap (merged)
  or are copied to the base after the merge (recorded there by the enabled bitmap).
"""

import os
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from ..qemu.names import disk_name
from .checkpoints import Action, ChainState, CheckpointChain, Segment


def overlay_file(top_file: str, directory: str | None, now: datetime | None = None) -> str:
    """Where the overlay of ``top_file`` goes: ``DIR/<stem>.snap-<UTC time>.qcow2``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")
    stem = os.path.basename(top_file)
    stem = stem[: -len(".qcow2")] if stem.endswith(".qcow2") else stem
    stem = stem.split(".snap-")[0]
    return os.path.join(directory or os.path.dirname(top_file), f"{stem}.snap-{stamp}.qcow2")


def snapshot_actions(
    checkpoints: CheckpointChain, state: ChainState, overlay_nodes: Mapping[str, str]
) -> list[Action]:
    newest = checkpoints.newest
    actions: list[Action] = []
    for disk, node in sorted(overlay_nodes.items()):
        top = state[disk][0]
        recording = None
        if newest is not None and newest.invalid is None:
            segments = newest.disks.get(disk, ())
            if segments and segments[-1].file == top.filename:
                bitmap = top.bitmap(segments[-1].bitmap)
                if bitmap is not None and not bitmap.inconsistent:
                    recording = (segments[-1].bitmap, bitmap)
        if recording is not None and recording[1].recording:
            actions.append(
                ("block-dirty-bitmap-disable", {"node": top.node_name, "name": recording[0]})
            )
        actions.append(("blockdev-snapshot", {"node": top.node_name, "overlay": node}))
        if recording is not None:
            actions.append(
                (
                    "block-dirty-bitmap-add",
                    {
                        "node": node,
                        "name": recording[0],
                        "granularity": recording[1].granularity,
                        "persistent": True,
                        "disabled": False,
                    },
                )
            )
    return actions


def after_snapshot(
    checkpoints: CheckpointChain, state: ChainState, overlays: Mapping[str, str]
) -> CheckpointChain:
    """The recording checkpoint gains a segment in each new overlay."""
    newest = checkpoints.newest
    if newest is None or newest.invalid is not None:
        return checkpoints
    disks = dict(newest.disks)
    for disk, file in overlays.items():
        segments = disks.get(disk, ())
        top = state[disk][0] if disk in state else None
        if segments and top is not None and segments[-1].file == top.filename:
            disks[disk] = (*segments, Segment(file, segments[-1].bitmap))
    return checkpoints.replaced(replace(newest, disks=disks))


def commit_merge_actions(
    checkpoints: CheckpointChain, state: ChainState, disks: Mapping[str, tuple[str, str]]
) -> list[Action]:
    """``disks``: disk → (top file, base file). Merge every segment on the top into the base."""
    actions: list[Action] = []
    for disk, (top_file, base_file) in sorted(disks.items()):
        layers = state[disk]
        top = next(layer for layer in layers if layer.filename == top_file)
        base = next(layer for layer in layers if layer.filename == base_file)
        for checkpoint in checkpoints:
            segments = checkpoint.disks.get(disk, ())
            on_top = next((s for s in segments if s.file == top_file), None)
            if on_top is None or top.bitmap(on_top.bitmap) is None:
                continue
            top_bitmap = top.bitmap(on_top.bitmap)
            assert top_bitmap is not None
            if top_bitmap.inconsistent:
                continue
            on_base = next((s for s in segments if s.file == base_file), None)
            target = on_base.bitmap if on_base is not None else on_top.bitmap
            existing = base.bitmap(target)
            if existing is None:
                actions.append(
                    (
                        "block-dirty-bitmap-add",
                        {
                            "node": base.node_name,
                            "name": target,
                            "granularity": top_bitmap.granularity,
                            # A raw base holds it in QEMU's memory (backup/in_memory.py).
                            "persistent": base.persistent_bitmaps,
                            "disabled": True,
                        },
                    )
                )
            actions.append(
                (
                    "block-dirty-bitmap-merge",
                    {
                        "node": base.node_name,
                        "target": target,
                        "bitmaps": [{"node": top.node_name, "name": on_top.bitmap}],
                    },
                )
            )
            if top_bitmap.recording and (existing is None or not existing.recording):
                actions.append(
                    ("block-dirty-bitmap-enable", {"node": base.node_name, "name": target})
                )
    return actions


def after_commit(
    checkpoints: CheckpointChain,
    disks: Mapping[str, tuple[str, str]],
    in_memory_bases: frozenset[str] = frozenset(),
) -> CheckpointChain:
    """Segments on each committed top move to its base (kept once, in chain order); on the
    bases of ``in_memory_bases`` (disks) they are bitmaps in QEMU's memory."""
    out = checkpoints
    for checkpoint in checkpoints:
        changed: dict[str, tuple[Segment, ...]] = {}
        for disk, (top_file, base_file) in disks.items():
            segments = checkpoint.disks.get(disk, ())
            on_top = next((s for s in segments if s.file == top_file), None)
            if on_top is None:
                continue
            has_base = any(s.file == base_file for s in segments)
            merged: list[Segment] = []
            for s in segments:
                if s.file == top_file:
                    if not has_base:
                        merged.append(
                            Segment(base_file, on_top.bitmap, disk not in in_memory_bases)
                        )
                else:
                    merged.append(s)
            changed[disk] = tuple(merged)
        if changed:
            out = out.replaced(replace(checkpoint, disks={**checkpoint.disks, **changed}))
    return out


def intent_disks(intent: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {disk: (d["top"], d["base"]) for disk, d in intent["disks"].items()}


def commit_job(op_id: str, disk: str) -> str:
    """The id of the commit job of ``disk`` in operation ``op_id``."""
    return disk_name("nbdsrv-commit", op_id[:8], disk)


def commit_result_problems(
    before: ChainState, after: ChainState, disks: Mapping[str, tuple[str, str]]
) -> str | None:
    """What differs between QEMU's chains after a commit and the chains it should have made
    (each committed disk loses its top, nothing else changes); None when all is as planned."""
    for disk in sorted(disks):
        expected = [layer.filename for layer in before[disk][1:]]
        actual = [layer.filename for layer in after.get(disk, ())]
        if actual != expected:
            return (
                f"disk {disk}: QEMU's chain is {' <- '.join(reversed(actual)) or 'gone'}, "
                f"expected {' <- '.join(reversed(expected))}"
            )
    return None
