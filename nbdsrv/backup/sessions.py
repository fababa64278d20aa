"""Pull-mode backup sessions: one point in time over every disk of a VM, exported read-only.

begin (the VM's lock held throughout)::

    request checked  ─►  backend.begin_point_in_time   (backends/: how the VM is driven; one
                         instant over all disks, the next checkpoint, frozen bitmaps, an
                         upstream NBD export per disk)
      ─►  frozen bitmaps read into memory, OR-merged into "since C" maps
      ─►  VM/DISK exports on every listener

A failure after the point in time ends it again (and deletes the new checkpoint): a failed
begin leaves nothing behind. end — and daemon stop — remove the exports (clients get
ESHUTDOWN), then the backend releases the point in time. When the backend can no longer hold
it, the session fails and its exports answer EIO.

QEMU fails every read of a broken snapshot (a failed copy-before-write) and says nothing on
QMP, so a failed upstream read or block status — or a one-sector probe read every
PROBE_INTERVAL, for sessions nobody reads — fails the session too, with the backend's
reason (``why_broken``).
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import (
    BeginRequest,
    CheckpointRef,
    PointInTime,
    PointInTimeRequest,
    UpstreamBitmap,
    UpstreamDisk,
    VMBackend,
)
from ..config.environment import seconds_from_environment
from ..errors import NbdsrvError, NotFoundError
from ..exports.catalog import ExportCatalog
from ..exports.dirty_bitmap import DirtyBitmap
from ..exports.upstream import UpstreamExport, fetch_bitmap
from ..net.address import Address
from ..proto.constants import DIRTY_BITMAP_PREFIX
from ..together import all_of
from .checkpoints import check_name, now_iso
from .crash_points import crash_point

log = logging.getLogger(__name__)

# Seconds between the probe reads that find a broken point in time without a reader
# (NBDSRV_PROBE_INTERVAL; readers' own failed reads fail the session at once).
PROBE_INTERVAL = 1.0


def probe_interval() -> float:
    return seconds_from_environment("NBDSRV_PROBE_INTERVAL", PROBE_INTERVAL)


class SessionError(NbdsrvError):
    """A backup session cannot begin or end as asked."""

    code = "session"


@dataclass
class Session:
    id: str
    vm: VMBackend
    created: str
    from_checkpoint: str | None
    checkpoint: str | None = None
    quiesced: bool = False
    exports: dict[str, UpstreamExport] = field(default_factory=dict)
    direct_uris: dict[str, str | None] = field(default_factory=dict)
    """Disk → QEMU's (or libvirt's) own export of the point in time (``direct_uri``)."""
    state: str = "running"
    error: str | None = None
    ending: bool = False
    prober: "asyncio.Task[None] | None" = None
    giving_up: "asyncio.Task[None] | None" = None

    def fail(self, reason: str) -> None:
        if self.ending:
            return
        first = self.state == "running"
        if first:
            self.state = "failed"
            self.error = reason
            log.error("session %s of VM %s failed: %s", self.id, self.vm.name, reason)
        for export in self.exports.values():
            export.fail(reason)
        if first:
            # Free the VM at once (filters out of the guest's path, scratch), not at the end.
            self.giving_up = asyncio.get_running_loop().create_task(
                self.vm.give_up_point_in_time(self.id)
            )


class SessionManager:
    """Every running backup session of the daemon."""

    def __init__(self, catalog: ExportCatalog, addresses: Sequence[Address]) -> None:
        self.catalog = catalog
        self.addresses = addresses
        self.sessions: dict[str, Session] = {}

    def _of_vm(self, vm: VMBackend) -> list[Session]:
        return [s for s in self.sessions.values() if s.vm is vm]

    def find(self, vm: VMBackend, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.vm is not vm:
            raise NotFoundError(f"VM {vm.name} has no backup session '{session_id}'")
        return session

    def has_session(self, vm: VMBackend) -> bool:
        return bool(self._of_vm(vm))

    # -- begin ----------------------------------------------------------------------------

    async def begin(self, vm: VMBackend, request: BeginRequest) -> Session:
        if request.bitmap_name is not None:
            # It becomes an NBD context name: the checkpoint name rules keep it short and plain.
            check_name(request.bitmap_name, "--bitmap-name")
        if request.no_checkpoint and request.checkpoint:
            raise SessionError("--checkpoint and --no-checkpoint exclude each other")
        if request.bitmap_name and not request.from_checkpoint:
            raise SessionError("--bitmap-name names the --from context: give --from too")
        if request.bitmap_name and request.all_checkpoints:
            raise SessionError("--bitmap-name cannot be combined with --all-checkpoints")
        if self._of_vm(vm):
            raise SessionError(f"VM {vm.name} already has a backup session running")
        if not vm.connected:
            raise SessionError(f"VM {vm.name}: QEMU is not connected")
        async with vm.lock:
            if self._of_vm(vm):
                raise SessionError(f"VM {vm.name} already has a backup session running")
            return await self._begin_locked(vm, request)

    async def _begin_locked(self, vm: VMBackend, request: BeginRequest) -> Session:
        session = Session(
            id=uuid.uuid4().hex[:12],
            vm=vm,
            created=now_iso(),
            from_checkpoint=request.from_checkpoint,
        )
        point = await vm.begin_point_in_time(
            PointInTimeRequest(session=session.id, **vars(request)),
            session.fail,
        )
        session.checkpoint = point.checkpoint
        session.quiesced = point.quiesced
        session.direct_uris = {d.disk: d.direct_uri for d in point.disks}
        try:
            await self._open_exports(session, request, point)
            crash_point("backup-begin:after-open")
            vm.confirm_point_in_time(session.id)
        except BaseException as e:
            log.warning("VM %s: backup begin failed, cleaning up: %s", vm.name, e)
            await self._close_exports(session)
            await vm.end_point_in_time(session.id, drop_checkpoint=True)
            raise
        self.sessions[session.id] = session
        session.prober = asyncio.create_task(_probe(session), name=f"probe {session.id}")
        log.info(
            "VM %s: backup session %s begun (checkpoint %s, from %s)",
            vm.name, session.id, session.checkpoint, request.from_checkpoint,
        )  # fmt: skip
        return session

    async def _open_exports(
        self, session: Session, request: BeginRequest, point: PointInTime
    ) -> None:
        """Every disk's export, the disks at the same time (each one's bitmaps too)."""
        await all_of(*(self._open_export(session, request, point, disk) for disk in point.disks))
        # In the disks' order, whichever connected first.
        session.exports = {d.disk: session.exports[d.disk] for d in point.disks}
        for export in session.exports.values():
            self.catalog.add(export)

    async def _open_export(
        self, session: Session, request: BeginRequest, point: PointInTime, disk: UpstreamDisk
    ) -> None:
        vm = session.vm
        address = Address("unix", path=disk.socket)
        export = UpstreamExport(
            f"{vm.name}/{disk.disk}",
            disk.size,
            address,
            disk.export,
            {},
            description=f"VM {vm.name} disk {disk.disk}, backup session {session.id}",
            on_failure=lambda detail: session.fail(vm.why_broken(session.id, detail)),
        )
        session.exports[disk.disk] = export  # from now on closed by a failed begin
        fetched: list[DirtyBitmap] = []

        async def fetch() -> None:
            fetched.extend(
                await all_of(
                    *(
                        _fetch_checked(address, disk.export, disk.disk, disk.size, upstream)
                        for upstream in disk.bitmaps
                    )
                )
            )

        # The export's own connections are made while the bitmaps are read.
        await all_of(fetch(), export.open())
        own: dict[str, DirtyBitmap] = {}
        cumulative: dict[str, DirtyBitmap] = {}
        for upstream, bitmap in zip(disk.bitmaps, fetched, strict=True):
            (cumulative if upstream.cumulative else own)[upstream.checkpoint] = bitmap
        export.freeze_bitmaps(
            _since_contexts(point.checkpoints, own, cumulative, disk.size, request)
        )

    # -- end ------------------------------------------------------------------------------

    async def end(self, vm: VMBackend, session_id: str) -> None:
        session = self.find(vm, session_id)
        async with vm.lock:
            session.ending = True
            await self._close_exports(session)
            try:
                await vm.end_point_in_time(session.id)
            except NbdsrvError as e:
                # Not ended: the backend keeps what it needs for `backup end` to run again.
                session.state, session.error = "ending", str(e)
                raise
        self.sessions.pop(session_id, None)
        log.info("VM %s: backup session %s ended", vm.name, session_id)

    async def _close_exports(self, session: Session) -> None:
        session.ending = True
        if session.prober is not None:
            session.prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.prober
        for export in session.exports.values():
            if self.catalog.find_export(export.name) is export:
                self.catalog.remove(export.name)
            await export.aclose()
        refused = sum(export.refusals for export in session.exports.values())
        if refused:
            # One line per session and cause, not one per refused request.
            log.warning(
                "session %s of VM %s: %d requests refused with EIO after it failed: %s",
                session.id, session.vm.name, refused, session.error,
            )  # fmt: skip
            for export in session.exports.values():
                export.refusals = 0

    async def end_all(self) -> None:
        for session in list(self.sessions.values()):
            try:
                await self.end(session.vm, session.id)
            except NbdsrvError as e:
                log.error("session %s: %s", session.id, e)

    # -- views ----------------------------------------------------------------------------

    def describe(self, session: Session) -> dict[str, Any]:
        disks = {}
        for disk, export in session.exports.items():
            disks[disk] = {
                "export": export.name,
                "uri": self.addresses[0].uri(export.name) if self.addresses else None,
                "uris": [a.uri(export.name) for a in self.addresses],
                "contexts": list(export.contexts),
                "direct_uri": session.direct_uris.get(disk),
                "size": export.size,
                "dirty_bytes": {
                    context: bitmap.dirty_bytes for context, bitmap in export.bitmaps.items()
                },
                "bytes_read": export.coverage.bytes,
                "clients": export.clients,
            }
        return {
            "id": session.id,
            "vm": session.vm.name,
            "checkpoint": session.checkpoint,
            "from": session.from_checkpoint,
            "quiesced": session.quiesced,
            "started": session.created,
            "created": session.created,
            "state": session.state,
            "error": session.error,
            "scratch_bytes": session.vm.scratch_bytes(session.id),
            "disks": disks,
        }


async def _probe(session: Session) -> None:
    """Find a broken point in time without waiting for a reader."""
    while session.state == "running" and not session.ending:
        await asyncio.sleep(probe_interval())
        for export in list(session.exports.values()):
            if session.state != "running" or session.ending:
                return
            await export.probe()


async def _fetch_checked(
    address: Address, export: str, disk: str, size: int, upstream: UpstreamBitmap
) -> DirtyBitmap:
    """A frozen bitmap read over NBD, checked against what QEMU counts for it."""
    bitmap = await fetch_bitmap(address, export, upstream.context, size, upstream.granularity)
    # QEMU counts whole granules, the last one too where the disk ends inside it.
    if upstream.dirty_bytes is not None and upstream.dirty_bytes != bitmap.qemu_count:
        raise SessionError(
            f"bitmap {upstream.checkpoint} of disk {disk}: read {bitmap.qemu_count} dirty "
            f"bytes over NBD but QEMU counts {upstream.dirty_bytes}"
        )
    return bitmap


def _since_contexts(
    wanted: Sequence[CheckpointRef],
    own: dict[str, DirtyBitmap],
    cumulative: dict[str, DirtyBitmap],
    size: int,
    request: BeginRequest,
) -> dict[str, DirtyBitmap]:
    """Context name → "changed since C", by OR-ing each checkpoint's own frozen bitmap into
    all older ones (suffix OR, newest first); a bitmap the backend already merged is taken as
    it is. A disk without a bitmap for some checkpoint (added later) is all dirty since then:
    never claim clean what nobody watched."""
    since: dict[str, DirtyBitmap] = {}
    later: DirtyBitmap | None = None
    for checkpoint in reversed(wanted):
        merged = cumulative.get(checkpoint.name)
        if merged is None:
            mine = own.get(checkpoint.name)
            if mine is None:
                mine = DirtyBitmap(size, checkpoint.granularity)
                mine.bits.setall(1)
            merged = mine if later is None else _or(mine, later)
        since[checkpoint.name] = merged
        later = merged
    contexts: dict[str, DirtyBitmap] = {}
    names = [c.name for c in wanted]
    if not request.all_checkpoints:
        names = [request.from_checkpoint] if request.from_checkpoint else []
    for name in names:
        label = request.bitmap_name if request.bitmap_name else name
        contexts[DIRTY_BITMAP_PREFIX + label] = since[name]
    return contexts


def _or(own: DirtyBitmap, later: DirtyBitmap) -> DirtyBitmap:
    """``own | later`` at ``own``'s granularity."""
    if own.granularity == later.granularity:
        return own | later
    merged = DirtyBitmap(own.size, own.granularity, own.bits.copy())
    offset = 0
    for length, flags in later.extents(0, later.size, limit=1 << 62):
        if flags:
            merged.mark(offset, length)
        offset += length
    return merged
