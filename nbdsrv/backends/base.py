"""The one small interface between what a backup is and how a VM is driven.

::

    daemon.py (control requests) ──┐
    backup/sessions.py ────────────┼──►  VMBackend
                                   │       ├── backends/qmp       a QEMU or QSD, private monitor
                                   │       ├── backends/embedded  nbdsrv's own QSD (a qmp VM)
                                   │       └── backends/libvirt   libvirt's checkpoint/backup API

A backend keeps its VM's checkpoints and makes points in time; sessions turn a
:class:`PointInTime` into `VM/DISK` exports (upstream reads, "since C" maps) and never
learn how the point in time was made. Checkpoint and session rules that do not depend on the
backend live in ``nbdsrv/backup/``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .views import CheckpointInfo, LibvirtVMStatus, QmpVMStatus


@dataclass(frozen=True, kw_only=True)
class BeginRequest:
    """What ``backup begin`` asks for, as the user gave it."""

    from_checkpoint: str | None = None
    checkpoint: str | None = None
    """Name of the checkpoint to create at the point in time (None: generated)."""
    no_checkpoint: bool = False
    all_checkpoints: bool = False
    bitmap_name: str | None = None
    """The ``--from`` context's name instead of the checkpoint's (``--bitmap-name``)."""
    granularity: int | None = None
    quiesce: bool = False
    """Freeze the guest's filesystems for the instant (guest agent); fail if impossible."""


@dataclass(frozen=True, kw_only=True)
class PointInTimeRequest(BeginRequest):
    """What a backup session asks of the backend (checked by the session first)."""

    session: str


@dataclass(frozen=True)
class UpstreamBitmap:
    """A frozen dirty bitmap the upstream NBD export offers as a meta context."""

    checkpoint: str
    context: str
    granularity: int
    dirty_bytes: int | None
    """What QEMU counts for it, to cross-check what is read (None: not known)."""
    cumulative: bool = False
    """True: already "changed since ``checkpoint``"; False: only ``checkpoint``'s own
    segment of the chain, to be OR-merged with the later ones."""


@dataclass(frozen=True)
class UpstreamDisk:
    """One disk of a point in time: where its frozen data is read over NBD."""

    disk: str
    size: int
    socket: str
    """Unix socket of the upstream NBD server."""
    export: str
    bitmaps: tuple[UpstreamBitmap, ...] = ()
    direct_uri: str | None = None
    """QEMU's (or libvirt's) own export of the point in time with the session's contexts,
    for local clients (None: the backend offers none)."""


@dataclass(frozen=True)
class CheckpointRef:
    name: str
    granularity: int


@dataclass(frozen=True)
class PointInTime:
    session: str
    checkpoint: str | None
    """The checkpoint created at this point in time, if any."""
    checkpoints: tuple[CheckpointRef, ...]
    """The checkpoints whose "since" maps the session offers or needs, oldest first."""
    disks: tuple[UpstreamDisk, ...]
    quiesced: bool = False


@dataclass(frozen=True)
class CreatedCheckpoint:
    name: str
    parent: str | None
    created: str
    quiesced: bool = False


BrokenCallback = Callable[[str], None]
"""Called with a reason when the backend can no longer hold a point in time."""


class VMBackend(Protocol):
    """A VM as sessions and the control socket see it."""

    name: str
    lock: asyncio.Lock
    """Held around every operation that changes the VM's checkpoints or points in time."""

    @property
    def connected(self) -> bool: ...

    @property
    def guest_frozen(self) -> bool:
        """True while a guest nbdsrv froze (--quiesce) is not confirmed thawed: from the
        daemon's own state, never a question to QEMU or the agent."""
        ...

    async def start(self) -> None:
        """Connect (retrying in the background), reconcile, and release what sessions of
        earlier daemons left behind."""

    async def stop(self) -> None: ...

    async def describe(self) -> QmpVMStatus | LibvirtVMStatus:
        """Its entry in `status` (never waits long on QEMU or libvirt)."""

    async def create_checkpoint(
        self, name: str | None, granularity: int | None, *, quiesce: bool = False
    ) -> CreatedCheckpoint: ...

    async def list_checkpoints(self) -> list[CheckpointInfo]: ...

    def known_checkpoints(self) -> list[tuple[str, bool]]:
        """Each checkpoint's name and validity as the daemon last saw them, oldest first:
        its own state only (for metrics), never a question to QEMU or libvirt."""
        ...

    async def delete_checkpoint(self, name: str) -> None: ...

    async def snapshot_create(self, directory: str | None) -> dict[str, str]: ...

    async def snapshot_commit(self) -> dict[str, str]: ...

    async def begin_point_in_time(
        self, request: PointInTimeRequest, on_broken: BrokenCallback
    ) -> PointInTime:
        """Hold the lock. Fix one point in time over all disks (and create the checkpoint);
        on failure nothing is left behind."""

    def confirm_point_in_time(self, session: str) -> None:
        """Hold the lock. The session's begin completed (its exports are open): the
        checkpoint it created stays from now on. Until then a restart removes it."""

    async def give_up_point_in_time(self, session: str) -> None:
        """The session failed: release at once what its point in time holds in the VM
        (filters out of the guest's write path, scratch freed) where the backend can;
        `end_point_in_time` still follows."""

    def scratch_bytes(self, session: str) -> int:
        """What copy-before-write has stored for ``session`` so far."""

    def why_broken(self, session: str, detail: str) -> str:
        """The reason a session shows when reading its point in time failed with
        ``detail`` (the backend may know more, e.g. that the scratch space is full)."""

    async def end_point_in_time(self, session: str, *, drop_checkpoint: bool = False) -> None:
        """Hold the lock. Release everything of ``session``; with ``drop_checkpoint`` also
        delete the checkpoint it created (a begin that failed after the point in time)."""
