"""Checkpoints whose bitmaps QEMU holds in memory: valid only in the process that made them.

Raw files, block devices and qcow2 v2 images cannot store a bitmap, so their part of a
checkpoint is a non-persistent bitmap (a segment with ``persistent`` False). Such a
checkpoint records which QEMU process holds it (``Checkpoint.process``: the id of a marker
object nbdsrv put into that process, qemu/process_marker.py). When QEMU runs as another
process, the bitmaps are gone, or are someone else's bitmaps of the same name that did not
see every write: the checkpoint becomes invalid for good, with a reason naming the restart.
A restart of nbdsrv alone changes nothing: the process and its bitmaps are still there.
"""

from .checkpoints import Checkpoint


def held_in_memory(checkpoint: Checkpoint) -> list[str]:
    """``disk (image)`` for every segment of ``checkpoint`` that QEMU holds in memory."""
    return [
        f"{disk} ({segment.file})"
        for disk, segments in sorted(checkpoint.disks.items())
        for segment in segments
        if not segment.persistent
    ]


def restart_problem(checkpoint: Checkpoint, markers: frozenset[str] | None) -> str | None:
    """Why ``checkpoint`` cannot be used in the QEMU process that holds ``markers`` (None: it
    can, or the process is not known yet)."""
    in_memory = held_in_memory(checkpoint)
    if not in_memory or markers is None or checkpoint.process in markers:
        return None
    return (
        "QEMU was restarted (a new process) since the checkpoint was made: its bitmaps held "
        f"in QEMU's memory are lost (disks {', '.join(in_memory)})"
    )
