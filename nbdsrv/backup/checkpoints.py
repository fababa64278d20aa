"""Checkpoint chains: the model and its rules.

Chain model (docs/checkpoints.md): one recording bitmap per disk at a time::

    c1 ──► c2 ──► c3 (recording)        bitmap cN holds the writes between cN and cN+1
    "changed since c2" = c2 | c3        (OR of the checkpoint's bitmap and every later one)

- create c4: all disks at once — c3 stops recording, c4 records (persistent where the top
  layer can store it, else in QEMU's memory: backup/in_memory.py).
- delete c2: all disks at once — c2 merged into c1 (c1 records again if c2 was recording),
  c2 removed; "since c1" = c1|c3 stays exact. Deleting the oldest just removes its bitmap.

A checkpoint's bitmap on one disk may lie on several layers of the backing chain (after an
external snapshot); each piece is a *segment* ``(image file, bitmap name)``. Image file names
identify layers because node names change when QEMU restarts.

Everything here is pure: no QMP, no files. nbdsrv.backends.qmp.bitmap_actions turns the
rules into QMP transactions and nbdsrv.backends.qmp.vm runs them against QEMU and
nbdsrv.backup.store.
"""

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from ..errors import NbdsrvError, NotFoundError

DEFAULT_GRANULARITY = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class CheckpointError(NbdsrvError):
    """A checkpoint operation refused before anything changed."""

    code = "checkpoint"


def check_name(name: object, what: str = "checkpoint name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(
            f"bad {what} {name!r}: use 1-128 letters, digits, '.', '_', '+', '-' "
            "(starting with a letter or digit)"
        )
    return name


def name_or_generated(name: str | None) -> str:
    """``name`` checked, or a generated one when none was given (an empty name is refused,
    never taken as "none")."""
    return generated_name() if name is None else check_name(name)


def check_granularity(granularity: int) -> int:
    if granularity < 512 or granularity & (granularity - 1) or granularity > 1 << 31:
        raise CheckpointError(
            f"bad granularity {granularity}: a power of two between 512 and 2 GiB"
        )
    return granularity


def generated_name(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return "ckpt-" + now.strftime("%Y%m%dT%H%M%S.%fZ")


@dataclass(frozen=True)
class Segment:
    """The part of a checkpoint's bitmap that lives on one layer."""

    file: str
    bitmap: str
    # False: the layer cannot store bitmaps (raw, a block device, qcow2 v2), so this one lives
    # in QEMU's memory and dies with the QEMU process (docs/checkpoints.md).
    persistent: bool = True


@dataclass(frozen=True)
class Checkpoint:
    name: str
    parent: str | None
    created: str
    granularity: int
    # disk id → segments, base layer first, the layer written now last.
    disks: Mapping[str, tuple[Segment, ...]] = field(default_factory=dict)
    # Once QEMU lost bits of a checkpoint it stays unusable: the reason is kept.
    invalid: str | None = None
    # The QEMU process (nbdsrv's marker in it) whose memory holds the in-memory segments.
    process: str | None = None

    @property
    def persistent(self) -> bool:
        """Every segment is stored in its image (survives a restart of QEMU)."""
        return all(s.persistent for segments in self.disks.values() for s in segments)

    def to_json(self) -> dict[str, Any]:
        document = {
            "name": self.name,
            "parent": self.parent,
            "created": self.created,
            "granularity": self.granularity,
            "disks": {
                disk: [_segment_json(s) for s in segments] for disk, segments in self.disks.items()
            },
            "invalid": self.invalid,
        }
        if self.process is not None:
            document["process"] = self.process
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Checkpoint":
        return cls(
            name=data["name"],
            parent=data.get("parent"),
            created=data["created"],
            granularity=int(data["granularity"]),
            disks={
                disk: tuple(
                    Segment(s["file"], s["bitmap"], bool(s.get("persistent", True)))
                    for s in segments
                )
                for disk, segments in data.get("disks", {}).items()
            },
            invalid=data.get("invalid"),
            process=data.get("process"),
        )


def _segment_json(segment: Segment) -> dict[str, Any]:
    document: dict[str, Any] = {"file": segment.file, "bitmap": segment.bitmap}
    if not segment.persistent:
        document["persistent"] = False
    return document


class BitmapState(Protocol):
    """What QEMU reports of one dirty bitmap."""

    @property
    def name(self) -> str: ...
    @property
    def persistent(self) -> bool: ...
    @property
    def recording(self) -> bool: ...
    @property
    def inconsistent(self) -> bool: ...
    @property
    def granularity(self) -> int: ...
    @property
    def count(self) -> int:
        """Dirty bytes, in whole granules."""
        ...


class LayerState(Protocol):
    """One image of a disk's backing chain as QEMU holds it now."""

    @property
    def node_name(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def persistent_bitmaps(self) -> bool:
        """The image can store bitmaps (qcow2 v3); others are held in QEMU's memory."""
        ...

    def bitmap(self, name: str) -> BitmapState | None: ...


# disk id → layers, top (written now) first.
ChainState = Mapping[str, Sequence[LayerState]]


class CheckpointChain:
    """The checkpoints of one VM, oldest first."""

    def __init__(self, checkpoints: Sequence[Checkpoint] = ()) -> None:
        self.checkpoints = list(checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def newest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def find(self, name: str) -> Checkpoint:
        for checkpoint in self.checkpoints:
            if checkpoint.name == name:
                return checkpoint
        raise NotFoundError(f"no checkpoint '{name}'")

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.checkpoints)

    def index(self, name: str) -> int:
        return self.checkpoints.index(self.find(name))

    def since(self, name: str) -> list[Checkpoint]:
        """The checkpoints whose bitmaps OR together to "changed since ``name``"."""
        return self.checkpoints[self.index(name) :]

    def added(self, checkpoint: Checkpoint) -> "CheckpointChain":
        return CheckpointChain([*self.checkpoints, checkpoint])

    def removed(self, name: str) -> "CheckpointChain":
        """Without ``name``; its child takes its parent."""
        gone = self.find(name)
        out = []
        for c in self.checkpoints:
            if c.name == name:
                continue
            out.append(replace(c, parent=gone.parent) if c.parent == name else c)
        return CheckpointChain(out)

    def replaced(self, checkpoint: Checkpoint) -> "CheckpointChain":
        return CheckpointChain(
            [checkpoint if c.name == checkpoint.name else c for c in self.checkpoints]
        )

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.checkpoints]

    @classmethod
    def from_json(cls, data: Sequence[Mapping[str, Any]]) -> "CheckpointChain":
        return cls([Checkpoint.from_json(d) for d in data])


def find_layer(layers: Sequence[LayerState], file: str) -> LayerState | None:
    """The layer whose image is ``file`` (the name a segment records): the same string,
    else the same real path (a chain opened through a symlink or a relative name)."""
    for layer in layers:
        if layer.filename == file:
            return layer
    if file.startswith("json:"):
        return None
    real = os.path.realpath(file)
    for layer in layers:
        if not layer.filename.startswith("json:") and os.path.realpath(layer.filename) == real:
            return layer
    return None


def segment_problem(checkpoint: Checkpoint, chain: ChainState, *, newest: bool) -> str | None:
    """Why QEMU's state cannot back ``checkpoint`` (None when it can).

    Rules: every segment's layer is in the disk's chain, holds the bitmap, persistent (unless
    the segment is in memory), consistent, at the checkpoint's granularity; the layers have
    one size; the newest checkpoint records on the top layer; a closed checkpoint records
    nowhere (its bitmaps are frozen: one that records was enabled by someone else).
    """
    for disk, segments in checkpoint.disks.items():
        layers = chain.get(disk)
        if layers is None:
            return f"disk {disk} is gone from the VM"
        sizes = set()
        for segment in segments:
            layer = find_layer(layers, segment.file)
            if layer is None:
                return f"disk {disk}: layer {segment.file} is no longer in the backing chain"
            bitmap = layer.bitmap(segment.bitmap)
            where = f"disk {disk} ({segment.file})"
            if bitmap is None:
                return f"bitmap '{segment.bitmap}' is missing on {where}"
            if bitmap.inconsistent:
                return (
                    f"bitmap '{segment.bitmap}' on {where} is inconsistent "
                    "(QEMU did not save it cleanly)"
                )
            if segment.persistent and not bitmap.persistent:
                return f"bitmap '{segment.bitmap}' on {where} is not persistent"
            if bitmap.granularity != checkpoint.granularity:
                return (
                    f"bitmap '{segment.bitmap}' on {where} has granularity "
                    f"{bitmap.granularity}, the checkpoint was made with "
                    f"{checkpoint.granularity} (re-created by someone else)"
                )
            if not newest and bitmap.recording:
                return (
                    f"bitmap '{segment.bitmap}' on {where} records writes, but its checkpoint "
                    "is closed (enabled by someone else)"
                )
            sizes.add(layer.virtual_size)
        if len(sizes) > 1:
            return f"disk {disk} changed size since the checkpoint"
        if newest and segments:
            top = layers[0]
            last = segments[-1]
            if last.file != top.filename:
                return f"disk {disk}: the top layer {top.filename} holds no part of the bitmap"
            bitmap = top.bitmap(last.bitmap)
            if bitmap is not None and not bitmap.recording:
                return f"bitmap '{last.bitmap}' on disk {disk} stopped recording writes"
    return None


# (image file, bitmap name) → (dirty bytes, recording) as nbdsrv last saw that bitmap.
SeenCounts = Mapping[tuple[str, str], tuple[int, bool]]


def observed_counts(
    checkpoints: CheckpointChain, chain: ChainState
) -> dict[tuple[str, str], tuple[int, bool]]:
    """The count and recording state of every checkpoint segment QEMU holds now."""
    seen: dict[tuple[str, str], tuple[int, bool]] = {}
    for checkpoint in checkpoints:
        for disk, segments in checkpoint.disks.items():
            for segment in segments:
                layer = find_layer(chain.get(disk, ()), segment.file)
                bitmap = layer.bitmap(segment.bitmap) if layer is not None else None
                if bitmap is not None:
                    seen[(segment.file, segment.bitmap)] = (bitmap.count, bitmap.recording)
    return seen


def count_problem(checkpoint: Checkpoint, chain: ChainState, seen: SeenCounts) -> str | None:
    """Why the counts QEMU shows now cannot follow from the ones nbdsrv saw last (None when
    they can). Between nbdsrv's own operations a recording bitmap only grows and a frozen one
    never changes; anything else is a clear, a remove and add, or a merge by someone else."""
    for disk, segments in checkpoint.disks.items():
        for segment in segments:
            before = seen.get((segment.file, segment.bitmap))
            layer = find_layer(chain.get(disk, ()), segment.file)
            bitmap = layer.bitmap(segment.bitmap) if layer is not None else None
            if before is None or bitmap is None:
                continue
            count, was_recording = before
            where = f"disk {disk} ({segment.file})"
            if bitmap.count < count:
                return (
                    f"bitmap '{segment.bitmap}' on {where} lost dirty bits: QEMU counts "
                    f"{bitmap.count} bytes, nbdsrv saw {count} (cleared or re-created by "
                    "someone else)"
                )
            if not was_recording and not bitmap.recording and bitmap.count != count:
                return (
                    f"frozen bitmap '{segment.bitmap}' on {where} changed: QEMU counts "
                    f"{bitmap.count} bytes, nbdsrv saw {count} (changed by someone else)"
                )
    return None


def assess(checkpoints: CheckpointChain, chain: ChainState) -> dict[str, str | None]:
    """Name → reason it is unusable (None when usable), oldest first.

    "Since C" needs C and every later checkpoint, so one broken checkpoint makes every
    older one unusable too.
    """
    reasons: dict[str, str | None] = {}
    later_broken: str | None = None
    items = list(checkpoints)
    for i in range(len(items) - 1, -1, -1):
        c = items[i]
        own = c.invalid or segment_problem(c, chain, newest=i == len(items) - 1)
        if own is not None:
            reasons[c.name] = own
            if later_broken is None:
                later_broken = c.name
        elif later_broken is not None:
            reasons[c.name] = f"later checkpoint '{later_broken}' is invalid"
        else:
            reasons[c.name] = None
    return {c.name: reasons[c.name] for c in items}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_checkpoint(
    checkpoints: CheckpointChain, chain: ChainState, name: str, granularity: int
) -> Checkpoint:
    """The checkpoint ``name`` made now after the newest one: one segment on every disk's
    top layer (in QEMU's memory where the top cannot store bitmaps). The bitmap that made
    the previous checkpoint record on that layer stops recording at the same instant."""
    disks: dict[str, tuple[Segment, ...]] = {}
    for disk, layers in sorted(chain.items()):
        top = layers[0]
        if top.bitmap(name) is not None:
            raise CheckpointError(f"disk {disk} already has a bitmap named '{name}'")
        disks[disk] = (Segment(top.filename, name, top.persistent_bitmaps),)
    previous = checkpoints.newest
    return Checkpoint(
        name=name,
        parent=previous.name if previous else None,
        created=now_iso(),
        granularity=granularity,
        disks=disks,
    )


def recording_segment(checkpoint: Checkpoint | None, disk: str, top: LayerState) -> str | None:
    """The bitmap of ``checkpoint`` on ``disk`` that records on the ``top`` layer now and
    can be stopped (an inconsistent or lost bitmap cannot: the new chain starts there)."""
    segments = checkpoint.disks.get(disk, ()) if checkpoint is not None else ()
    if not segments or segments[-1].file != top.filename:
        return None
    bitmap = top.bitmap(segments[-1].bitmap)
    if bitmap is None or not bitmap.recording or bitmap.inconsistent:
        return None
    return segments[-1].bitmap


def merged_parent(checkpoints: CheckpointChain, name: str) -> CheckpointChain:
    """The chain after deleting ``name``: its parent gains the segments it did not have."""
    victim = checkpoints.find(name)
    chain = checkpoints
    if victim.parent:
        parent = checkpoints.find(victim.parent)
        if victim.invalid is not None and parent.invalid is None:
            # The parent's bitmap now holds the victim's bits: as wrong as they were.
            parent = replace(
                parent, invalid=f"merged with invalid checkpoint '{name}': {victim.invalid}"
            )
        disks = dict(parent.disks)
        for disk, segments in victim.disks.items():
            have = {s.file for s in disks.get(disk, ())}
            extra = tuple(
                Segment(s.file, parent.name, s.persistent) for s in segments if s.file not in have
            )
            if extra:
                disks[disk] = (*disks.get(disk, ()), *extra)
        process = parent.process or victim.process
        chain = chain.replaced(replace(parent, disks=disks, process=process))
    return chain.removed(name)


def wanted_checkpoints(
    chain: CheckpointChain,
    reasons: Mapping[str, str | None],
    from_checkpoint: str | None,
    all_checkpoints: bool,
) -> list[Checkpoint]:
    """The checkpoints whose frozen bitmaps a backup session needs, oldest first: those
    since ``from_checkpoint`` (which must be valid), or every valid one."""
    if from_checkpoint:
        start = chain.find(from_checkpoint)
        if reasons[start.name] is not None:
            raise CheckpointError(
                f"checkpoint '{start.name}' cannot be used: {reasons[start.name]}; "
                "take a full backup"
            )
    if all_checkpoints:
        return [c for c in chain if reasons[c.name] is None]
    if from_checkpoint:
        return chain.since(from_checkpoint)
    return []
