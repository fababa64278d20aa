"""External snapshots and commits that keep every checkpoint exact (pure rules).

A checkpoint's bitmap follows the disk up and down its backing chain as *segments*::

    before:   base.qcow2 [c1 c2●]                         ● recording
    snapshot: base.qcow2 [c1 c2] ◄── snap1.qcow2 [c2●]     c2 = base:c2 | snap1:c2
    c3:       base.qcow2 [c1 c2] ◄── snap1.qcow2 [c2 c3●]
    commit:   base.qcow2 [c1 c2 c3●]                        snap1's segments merged down

- snapshot create: all disks at once — the recording bitmap stops on the old top and goes
  on, same name and granularity, in the new overlay. The recording checkpoint gains a
  segment.
- snapshot commit: the top is committed into the layer directly below it (never deeper:
  the bottom of the chain may be a shared template); while the commit runs, every segment
  of the top is merged into the base (which gains the bitmap where it lacks one) and the
  base's copy of the recording bitmap records. Writes that land meanwhile are in the top's
  recording bitmap (merged) or are copied to the base after the merge (recorded there).
  The top's segments then move to the base.

The QMP transactions that carry this out are backends/qmp/bitmap_actions.py.
"""

import os
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from .checkpoints import ChainState, CheckpointChain, Segment


def overlay_file(top_file: str, directory: str | None, now: datetime | None = None) -> str:
    """Where the overlay of ``top_file`` goes: ``DIR/<stem>.snap-<UTC time>.qcow2``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")
    stem = os.path.basename(top_file)
    stem = stem[: -len(".qcow2")] if stem.endswith(".qcow2") else stem
    stem = stem.split(".snap-")[0]
    return os.path.join(directory or os.path.dirname(top_file), f"{stem}.snap-{stamp}.qcow2")


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
