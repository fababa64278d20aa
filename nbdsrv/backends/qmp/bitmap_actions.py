"""The QMP transactions that change a VM's checkpoint chain: the bitmap actions of
checkpoint create and delete, external snapshot and commit (the rules they carry out are
backup/checkpoints.py and backup/snapshots.py; docs/checkpoints.md, docs/snapshots.md).

- create c4: ``block-dirty-bitmap-disable`` the recording c3 on each top layer, and
  ``block-dirty-bitmap-add`` c4 (enabled; persistent where the layer can store it).
- delete c2: ``block-dirty-bitmap-merge`` c2 into c1 on every layer (``-add`` c1 where a
  layer lacks it, ``-enable`` it where c2 was recording), then ``-remove`` c2.
- snapshot: disable the recording bitmap on the old top, ``blockdev-snapshot`` onto the new
  overlay, add the recording bitmap (same name, same granularity, persistent) in it.
- commit (once the active ``block-commit`` job is ready): merge every segment of the top
  into the base, adding the base's bitmap where it lacks one, and enable the base's copy of
  the recording bitmap; then the job completes.
"""

from collections.abc import Mapping
from typing import Any

from ...backup.checkpoints import (
    ChainState,
    Checkpoint,
    CheckpointChain,
    find_layer,
    new_checkpoint,
    recording_segment,
)

Action = tuple[str, dict[str, Any]]


def create_actions(
    checkpoints: CheckpointChain, chain: ChainState, name: str, granularity: int
) -> tuple[Checkpoint, list[Action]]:
    """The new checkpoint and the one transaction that makes it on every disk."""
    checkpoint = new_checkpoint(checkpoints, chain, name, granularity)
    actions: list[Action] = []
    for disk, layers in sorted(chain.items()):
        top = layers[0]
        recording = recording_segment(checkpoints.newest, disk, top)
        if recording is not None:
            actions.append(
                ("block-dirty-bitmap-disable", {"node": top.node_name, "name": recording})
            )
        actions.append(
            (
                "block-dirty-bitmap-add",
                {
                    "node": top.node_name,
                    "name": name,
                    "granularity": granularity,
                    "persistent": top.persistent_bitmaps,
                    "disabled": False,
                },
            )
        )
    return checkpoint, actions


def delete_actions(checkpoints: CheckpointChain, chain: ChainState, name: str) -> list[Action]:
    """One transaction: merge ``name`` into its parent on every layer (adding the parent's
    bitmap where a layer lacks it), re-enable the parent where ``name`` was recording, then
    remove ``name``. Segments QEMU no longer holds are skipped."""
    victim = checkpoints.find(name)
    parent = checkpoints.find(victim.parent) if victim.parent else None
    actions: list[Action] = []
    for disk, segments in sorted(victim.disks.items()):
        layers = chain.get(disk, ())
        parent_segments = {s.file: s for s in parent.disks.get(disk, ())} if parent else {}
        for segment in segments:
            layer = find_layer(layers, segment.file)
            bitmap = layer.bitmap(segment.bitmap) if layer is not None else None
            if layer is None or bitmap is None:
                continue
            node = layer.node_name
            if parent is not None and not bitmap.inconsistent:
                target = parent_segments.get(segment.file)
                target_bitmap = layer.bitmap(target.bitmap) if target else None
                if target is None or target_bitmap is None:
                    target_name = parent.name
                    actions.append(
                        (
                            "block-dirty-bitmap-add",
                            {
                                "node": node,
                                "name": target_name,
                                "granularity": parent.granularity,
                                "persistent": bitmap.persistent,
                                "disabled": not bitmap.recording,
                            },
                        )
                    )
                else:
                    target_name = target.bitmap
                    if bitmap.recording and not target_bitmap.recording:
                        actions.append(
                            ("block-dirty-bitmap-enable", {"node": node, "name": target_name})
                        )
                actions.append(
                    (
                        "block-dirty-bitmap-merge",
                        {"node": node, "target": target_name, "bitmaps": [segment.bitmap]},
                    )
                )
            actions.append(("block-dirty-bitmap-remove", {"node": node, "name": segment.bitmap}))
    return actions


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
