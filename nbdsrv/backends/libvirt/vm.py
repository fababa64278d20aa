"""A libvirt domain as an nbdsrv VM: libvirt's checkpoints and pull-mode backups, nothing else.

    nbdsrv                          libvirt (virDomain…)
    checkpoint create VM [--name]   CheckpointCreateXML  (a bitmap per qcow2 disk)
    checkpoint list VM              ListAllCheckpoints + GetXMLDesc(SIZE): a disk without
                                    size has lost its bitmap → invalid, with libvirt's
                                    own words (a REDEFINE_VALIDATE of the same XML, which
                                    fails and so changes nothing)
    checkpoint delete VM C          CheckpointDelete
    backup begin VM [--from C]      BackupBegin(pull, unix socket in the state dir, scratch
                  [--checkpoint N]    in the scratch dir, exportbitmap=C) + the new
                                    checkpoint N in the same call
    backup end VM ID                AbortJob, then wait until the job is gone
    snapshot create|commit,         refused: libvirt's own snapshot-create-as --disk-only and
    --all-checkpoints                 blockcommit keep its checkpoints consistent; libvirt
                                      exports one bitmap per disk

In libvirt every checkpoint's bitmap records from its creation on (all at once), so the
exported ``qemu:dirty-bitmap:C`` is already "changed since C": sessions take it as it is.
No monitor is added and nothing taints the domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...backup.checkpoints import CheckpointError, check_name, generated_name
from ...backup.crash_points import crash_point
from ...backup.store import read_json, remove_durably, write_json
from ...errors import NbdsrvError, NotFoundError
from ...proto.constants import DIRTY_BITMAP_PREFIX
from ...qemu.block_exports import unix_uri
from ..base import (
    BrokenCallback,
    CheckpointRef,
    CreatedCheckpoint,
    PointInTime,
    PointInTimeRequest,
    UpstreamBitmap,
    UpstreamDisk,
)
from ..frozen_guest import FrozenGuest
from ..views import CheckpointInfo, LibvirtVMStatus
from . import dirs
from .connection import LibvirtConnection, LibvirtError
from .xmldesc import (
    BackupDisk,
    CheckpointDesc,
    DomainDisk,
    backup_socket,
    backup_xml,
    checkpoint_xml,
    domain_disks,
    parse_checkpoint,
    qemu_ids,
)

log = logging.getLogger(__name__)

# How long libvirt may take to tear a backup job down after abortJob returns.
JOB_GONE_TIMEOUT = 60.0
DEFAULT_GRANULARITY = 64 * 1024
QCOW2_MAGIC = b"QFI\xfb"


class ThawNotConfirmed(NbdsrvError):
    """libvirt's guest agent did not confirm the thaw (raised in a call thread; the event
    loop side starts the retries)."""

    code = "guest-frozen"


class LibvirtRefusal(NbdsrvError):
    """An nbdsrv operation that libvirt domains do not offer; the message says what to use."""

    code = "libvirt-refused"


@dataclass
class HeldBackup:
    """A libvirt backup job that a session of this daemon reads from."""

    session: str
    socket: Path
    scratch: list[Path]
    checkpoint: str | None
    on_broken: BrokenCallback
    ending: bool = False
    broken: bool = False
    # A begin that failed and whose end failed too: no session to end it again, so the
    # daemon ends it when libvirt is back (reconnected).
    orphaned: bool = False

    def break_(self, reason: str) -> None:
        if not self.ending and not self.broken:
            self.broken = True
            self.on_broken(reason)


@dataclass
class _Snapshot:
    """What one executor hop learned about the domain."""

    disks: list[DomainDisk]
    owner: tuple[int, int] | None
    job: str | None = None
    checkpoints: list[tuple[CheckpointDesc, str | None]] = field(default_factory=list)


class LibvirtVM:
    """One running libvirt domain (a :class:`~nbdsrv.backends.base.VMBackend`)."""

    def __init__(
        self,
        name: str,
        connection: LibvirtConnection,
        state_dir: str,
        scratch_dir: str,
        on_released: Callable[[LibvirtVM], None] | None = None,
    ) -> None:
        self.name = name
        self.connection = connection
        self.libvirt = connection.libvirt
        self.state_dir = state_dir
        self.scratch_dir = scratch_dir
        self.lock = asyncio.Lock()
        self.points: dict[str, HeldBackup] = {}
        self.running = True
        self.failure: str | None = None
        # Called when the domain has stopped and no session holds this VM any more.
        self.on_released = on_released
        # Checkpoint names and validity as last seen (for metrics: no libvirt call).
        self._known: list[tuple[str, bool]] = []
        # A guest frozen by --quiesce whose thaw libvirt has not confirmed yet. Not in
        # <state-dir>/libvirt/<VM>/: start() clears that directory.
        self.frozen_guest = FrozenGuest(name, str(Path(state_dir) / "vms" / name), self._thaw_once)

    @property
    def connected(self) -> bool:
        return self.running and self.connection.connected

    @property
    def guest_frozen(self) -> bool:
        return self.frozen_guest.frozen

    async def _thaw_once(self) -> bool:
        await self._call(self._thaw)
        return True

    # -- life -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Abort a backup job an earlier daemon left on the domain (its sessions are gone
        with it) and remove the files it left. A guest an earlier daemon froze and did not
        see thawed (killed between freeze and thaw) is thawed, retried until libvirt's agent
        confirms."""
        if self.frozen_guest.frozen:
            log.warning("VM %s: an earlier daemon may have left the guest frozen", self.name)
            self.frozen_guest.keep_thawing()
        unfinished = read_json(str(self._begin_record()))
        try:
            job = await self._call(self._job_xml)
            if job is not None and self._is_ours(backup_socket(job)):
                log.warning("VM %s: aborting the backup job an earlier nbdsrv left", self.name)
                await self._abort_and_wait()
            if isinstance(unfinished, dict) and unfinished.get("checkpoint"):
                # A begin that did not complete leaves no checkpoint behind; libvirt merges
                # its bits into the parent, so "since the parent" stays exact.
                await self._drop_checkpoint(str(unfinished["checkpoint"]), unfinished)
        except LibvirtError as e:
            log.warning("VM %s: %s", self.name, e)
            return
        for base in (self.state_dir, self.scratch_dir):
            path = Path(base) / "libvirt" / self.name
            if path.is_dir() and (job is None or self._is_ours(backup_socket(job))):
                dirs.clear(path)

    def _begin_record(self) -> Path:
        """Written before a backup begin that creates a checkpoint, removed once the
        session confirms it: a restart that finds it deletes that checkpoint."""
        return Path(self.state_dir) / "libvirt" / self.name / "begin.json"

    async def _drop_checkpoint(self, name: str, record: dict[str, Any]) -> None:
        log.warning(
            "VM %s: deleting checkpoint %s of the unfinished backup begin %s",
            self.name, name, record.get("session"),
        )  # fmt: skip
        try:
            await self._call(self._delete_checkpoint, name)
        except LibvirtError as e:
            if e.libvirt_code != self.libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                raise
        remove_durably(str(self._begin_record()))

    async def give_up_point_in_time(self, session: str) -> None:
        """libvirt's job owns the scratch space; `backup end` aborts it (after the upstream
        connections are closed: see end_point_in_time)."""

    def confirm_point_in_time(self, session: str) -> None:
        held = self.points.get(session)
        if held is not None and held.checkpoint is not None:
            remove_durably(str(self._begin_record()))

    async def stop(self) -> None:
        """Sessions were ended before; the domain keeps running under libvirt (a guest not
        confirmed thawed stays marked: the next daemon retries)."""
        await self.frozen_guest.stop()

    def domain_stopped(self, reason: str) -> None:
        """The domain stopped: its sessions fail (EIO); the VM goes once none holds it."""
        self.running = False
        self.failure = reason
        # A guest that stopped is frozen no more: its next run boots afresh.
        self.frozen_guest.forget()
        for held in self.points.values():
            held.break_(reason)
        if not self.points and self.on_released is not None:
            self.on_released(self)

    async def job_completed(self, params: dict[str, Any]) -> None:
        """A backup job of the domain ended; unless nbdsrv ended it, the session fails. The
        event names no job: one that comes late for an earlier session's job must not break
        the next session, so the job is looked up first."""
        if not self.points:
            return
        message = params.get("errmsg") or ("completed" if params.get("success") else "failed")
        try:
            job = await self._call(self._job_xml)
        except LibvirtError:
            job = None
        for held in self.points.values():
            if job is None or backup_socket(job) != str(held.socket):
                held.break_(f"libvirt's backup job ended behind nbdsrv's back ({message})")

    async def reconnected(self) -> None:
        """libvirtd came back: the jobs of running sessions must still be there; failed
        begins that could not be undone without libvirt are undone now."""
        for held in [h for h in self.points.values() if h.orphaned]:
            async with self.lock:
                try:
                    await self.end_point_in_time(held.session, drop_checkpoint=True)
                except LibvirtError as e:
                    log.warning("VM %s: failed begin %s not undone yet: %s",
                                self.name, held.session, e)  # fmt: skip
        if not self.points:
            return
        try:
            job = await self._call(self._job_xml)
        except LibvirtError as e:
            job = None
            log.warning("VM %s: %s", self.name, e)
        for held in self.points.values():
            if job is None or backup_socket(job) != str(held.socket):
                held.break_("libvirt's backup job is gone")

    # -- views ----------------------------------------------------------------------------------

    async def describe(self) -> LibvirtVMStatus:
        info: LibvirtVMStatus = {
            "name": self.name,
            "backend": "libvirt",
            "libvirt": self.connection.uri,
            "connected": self.connected,
            "error": self.failure or self.connection.failure,
            "guest_frozen": self.guest_frozen,
            "disks": [],
            "checkpoints": [],
        }
        if self.connected:
            try:
                # Names only: validating every checkpoint costs QEMU work on each status.
                snap = await self._call(self._snapshot, "names")
                info["disks"] = sorted(d.target for d in snap.disks)
                info["checkpoints"] = [c.name for c, _ in snap.checkpoints]
                valid = dict(self._known)
                self._known = [(c.name, valid.get(c.name, True)) for c, _ in snap.checkpoints]
            except LibvirtError as e:
                info["error"] = str(e)
        return info

    async def disks(self) -> list[str]:
        snap = await self._call(self._snapshot, None)
        return sorted(d.target for d in snap.disks)

    # -- checkpoints ----------------------------------------------------------------------------

    async def create_checkpoint(
        self, name: str | None, granularity: int | None = None, *, quiesce: bool = False
    ) -> CreatedCheckpoint:
        if granularity is not None:
            raise LibvirtRefusal(
                f"VM {self.name} is a libvirt domain: libvirt gives each bitmap the image's "
                "cluster size as granularity; leave out --granularity"
            )
        name = check_name(name) if name is not None else generated_name()
        async with self.lock:
            try:
                desc: CheckpointDesc = await self._call(self._create_checkpoint, name, quiesce)
            except ThawNotConfirmed as e:
                # The command fails: it leaves no checkpoint.
                with contextlib.suppress(LibvirtError):
                    await self._call(self._delete_checkpoint_if_any, name)
                raise self.frozen_guest.not_thawed(str(e)) from None
        return CreatedCheckpoint(desc.name, desc.parent, desc.created, quiesced=quiesce)

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        snap = await self._call(self._snapshot, "validated")
        self._known = [(c.name, reason is None) for c, reason in snap.checkpoints]
        return [
            {
                "name": c.name,
                "parent": c.parent,
                "created": c.created,
                "disks": sorted(c.bitmaps),
                "valid": reason is None,
                "reason": reason,
                "persistent": True,  # libvirt makes checkpoints on qcow2 v3 images only
            }
            for c, reason in snap.checkpoints
        ]

    def known_checkpoints(self) -> list[tuple[str, bool]]:
        return list(self._known)

    async def delete_checkpoint(self, name: str) -> None:
        async with self.lock:
            try:
                await self._call(self._delete_checkpoint, name)
            except LibvirtError as e:
                if e.libvirt_code == self.libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    raise NotFoundError(f"VM {self.name} has no checkpoint '{name}'") from e
                if "not found in backing chain" in str(e):
                    raise LibvirtError(
                        f"VM {self.name}: cannot delete checkpoint {name} ({e}); "
                        f"`virsh checkpoint-delete {self.name} {name} --metadata` forgets it"
                    ) from e
                raise

    async def snapshot_create(self, directory: str | None = None) -> dict[str, str]:
        raise LibvirtRefusal(
            f"VM {self.name} is a libvirt domain: use `virsh snapshot-create-as {self.name} "
            "--disk-only`, which carries libvirt's checkpoints into the new overlays"
        )

    async def snapshot_commit(self) -> dict[str, str]:
        raise LibvirtRefusal(
            f"VM {self.name} is a libvirt domain: use `virsh blockcommit {self.name} DISK "
            "--active --pivot`, which keeps libvirt's checkpoints consistent"
        )

    # -- points in time -------------------------------------------------------------------------

    async def begin_point_in_time(
        self, request: PointInTimeRequest, on_broken: BrokenCallback
    ) -> PointInTime:
        if request.all_checkpoints:
            raise LibvirtRefusal(
                f"VM {self.name} is a libvirt domain: libvirt exports one bitmap per disk, so "
                "--all-checkpoints is not offered; begin one session per --from checkpoint"
            )
        if request.granularity is not None:
            raise LibvirtRefusal(
                f"VM {self.name} is a libvirt domain: libvirt chooses the bitmap granularity"
            )
        if not self.connected:
            raise LibvirtError(f"VM {self.name}: {self.failure or self.connection.failure}")
        new = None
        if not request.no_checkpoint:
            new = check_name(request.checkpoint) if request.checkpoint else generated_name()
        snap = await self._call(self._snapshot, None, request.from_checkpoint)
        if snap.job is not None:
            # A second BackupBegin would wait 30 s for libvirt's job lock and then fail.
            raise LibvirtError(
                f"VM {self.name}: libvirt already runs a backup job on this domain "
                f"(`virsh domjobabort {self.name}` ends it)"
            )
        with_bitmap = self._incremental_disks(snap, request.from_checkpoint)
        socket_dir = dirs.vm_dir(self.state_dir, self.name, snap.owner)
        scratch_dir = dirs.vm_dir(self.scratch_dir, self.name, snap.owner)
        socket = socket_dir / "nbd.sock"
        socket.unlink(missing_ok=True)
        backup = [
            BackupDisk(
                target=d.target,
                scratch=str(scratch_dir / f"{request.session}-{d.target}.qcow2"),
                export=d.target,
                # exportbitmap: the context's name, as nbdsrv's own export offers it, so
                # that libvirt's export serves as the session's direct_uri too.
                bitmap=(request.bitmap_name or request.from_checkpoint)
                if d.target in with_bitmap
                else None,
            )
            for d in snap.disks
        ]
        held = HeldBackup(
            request.session, socket, [Path(b.scratch) for b in backup], new, on_broken
        )
        backup_doc = backup_xml(str(socket), backup, request.from_checkpoint, skip=[])
        checkpoint_doc = checkpoint_xml(new, snap.disks) if new is not None else None
        started = time.monotonic()
        if new is not None:
            write_json(str(self._begin_record()), {"session": request.session, "checkpoint": new})
        try:
            await self._call(self._backup_begin, backup_doc, checkpoint_doc, request.quiesce)
        except ThawNotConfirmed as e:
            # The command fails: it leaves no job and no checkpoint.
            self.points[request.session] = held
            await self.end_point_in_time(request.session, drop_checkpoint=True)
            remove_durably(str(self._begin_record()))
            raise self.frozen_guest.not_thawed(str(e)) from None
        except LibvirtError as e:
            if new is not None and e.libvirt_code is not None:
                # libvirt refused: it created no checkpoint. (Without an answer it may have:
                # the record stays for the next start.)
                remove_durably(str(self._begin_record()))
            raise
        self.points[request.session] = held
        log.info(
            "VM %s: libvirt backup job begun in %.2f s (session %s, from %s, checkpoint %s)",
            self.name, time.monotonic() - started, request.session, request.from_checkpoint, new,
        )  # fmt: skip
        try:
            sizes = await self._call(self._sizes, [d.target for d in snap.disks])
        except BaseException:
            await self.end_point_in_time(request.session, drop_checkpoint=True)
            raise
        upstream = []
        for disk in snap.disks:
            bitmaps: tuple[UpstreamBitmap, ...] = ()
            if disk.target in with_bitmap and request.from_checkpoint is not None:
                bitmaps = (
                    UpstreamBitmap(
                        checkpoint=request.from_checkpoint,
                        context=DIRTY_BITMAP_PREFIX
                        + (request.bitmap_name or request.from_checkpoint),
                        granularity=bitmap_granularity(disk.source),
                        dirty_bytes=None,
                        cumulative=True,
                    ),
                )
            upstream.append(
                UpstreamDisk(
                    disk.target,
                    sizes[disk.target],
                    str(socket),
                    disk.target,
                    bitmaps,
                    direct_uri=unix_uri(disk.target, str(socket)),
                )
            )
        checkpoints: tuple[CheckpointRef, ...] = ()
        if request.from_checkpoint is not None:
            checkpoints = (CheckpointRef(request.from_checkpoint, DEFAULT_GRANULARITY),)
        return PointInTime(
            request.session, new, checkpoints, tuple(upstream), quiesced=request.quiesce
        )

    def scratch_bytes(self, session: str) -> int:
        """Space the session's scratch images take on disk (libvirt's ``disk_temp_used``
        needs a call to libvirtd; this is what the file system says, metadata included)."""
        held = self.points.get(session)
        total = 0
        for path in held.scratch if held is not None else []:
            with contextlib.suppress(OSError):
                total += path.stat().st_blocks * 512
        return total

    def why_broken(self, session: str, detail: str) -> str:
        """libvirt's job owns the scratch space: nothing to add to what the read said."""
        return detail

    def _incremental_disks(self, snap: _Snapshot, from_checkpoint: str | None) -> set[str]:
        """The disks whose "since ``from_checkpoint``" libvirt can export; the others (added
        later) are backed up in full. An invalid checkpoint is refused with libvirt's words."""
        if from_checkpoint is None:
            return set()
        for checkpoint, reason in snap.checkpoints:
            if checkpoint.name == from_checkpoint:
                if reason is not None:
                    raise CheckpointError(
                        f"checkpoint {from_checkpoint} of VM {self.name} is not valid "
                        f"({reason}): begin a full backup (without --from)"
                    )
                return set(checkpoint.bitmaps)
        raise NotFoundError(f"VM {self.name} has no checkpoint '{from_checkpoint}'")

    async def end_point_in_time(self, session: str, *, drop_checkpoint: bool = False) -> None:
        """Callers close every upstream connection first: a client that connects while
        libvirt stops QEMU's NBD server can hang it and lock the domain."""
        held = self.points.get(session)
        if held is None:
            return
        if self.running and not self.connection.connected:
            # The job and its scratch files stay in QEMU: nothing is ended until libvirt
            # says so. Everything is kept for `backup end` to be run again.
            held.orphaned = drop_checkpoint
            raise LibvirtError(
                f"VM {self.name}: cannot end backup session {session}: libvirt is not "
                f"connected ({self.connection.failure or 'libvirtd is down'}); the session "
                "and its scratch files stay: run `backup end` again once libvirtd is back"
            )
        held.ending = True
        try:
            if self.connected:
                job = await self._call(self._job_xml)
                if job is not None and backup_socket(job) == str(held.socket):
                    await self._abort_and_wait()
        except BaseException:
            # libvirt did not say the job is gone (libvirtd went away meanwhile, ...): the
            # session, its job and its scratch files stay for `backup end` to run again.
            held.ending = False
            held.orphaned = drop_checkpoint
            raise
        if self.connected and drop_checkpoint and held.checkpoint is not None:
            try:
                await self._call(self._delete_checkpoint, held.checkpoint)
                remove_durably(str(self._begin_record()))
            except LibvirtError as e:
                log.warning(
                    "VM %s: cannot delete checkpoint %s (the next start does): %s",
                    self.name, held.checkpoint, e,
                )  # fmt: skip
        # libvirt removes them itself, except when the domain died under the job.
        for path in [held.socket, *held.scratch]:
            path.unlink(missing_ok=True)
        self.points.pop(session, None)
        if not self.running and not self.points and self.on_released is not None:
            self.on_released(self)

    async def _abort_and_wait(self) -> None:
        await self._call(self._abort_job)
        deadline = time.monotonic() + JOB_GONE_TIMEOUT
        while await self._call(self._job_xml) is not None:
            if time.monotonic() > deadline:
                raise LibvirtError(
                    f"VM {self.name}: libvirt's backup job still runs {JOB_GONE_TIMEOUT:g} s "
                    "after it was aborted"
                )
            await asyncio.sleep(0.05)

    def _is_ours(self, socket: str | None) -> bool:
        return socket is not None and Path(socket).parent == (
            Path(self.state_dir) / "libvirt" / self.name
        )

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.connection.call(fn, *args)

    # -- blocking parts, run in the connection's threads ----------------------------------------

    def _domain(self) -> Any:
        try:
            return self.connection.conn.lookupByName(self.name)
        except self.libvirt.libvirtError as e:
            if e.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError(f"VM {self.name}: the domain is gone", e.get_error_code()) from e
            raise

    def _snapshot(self, checkpoints: str | None, only: str | None = None) -> _Snapshot:
        """The domain's disks and backup job, and its checkpoints: ``checkpoints`` None (none,
        unless ``only`` names one), ``names`` (not validated) or ``validated``."""
        libvirt = self.libvirt
        dom = self._domain()
        xml = dom.XMLDesc(0)
        disks = [d for d in domain_disks(xml) if d.source and d.kind in ("file", "block")]
        snap = _Snapshot(disks, qemu_ids(xml), job=self._job_xml(dom))
        if checkpoints is not None or only is not None:
            validate = checkpoints == "validated" or only is not None
            flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
            if validate:
                # A disk whose bitmap libvirt cannot use has no size.
                flags |= libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE
            found = []
            for index, checkpoint in enumerate(
                dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
            ):
                if only is not None and checkpoint.getName() != only:
                    continue
                desc = parse_checkpoint(checkpoint.getXMLDesc(flags))
                reason = self._invalid_reason(dom, checkpoint, desc) if validate else None
                found.append((desc.creation_time, index, desc, reason))
            # Oldest first; topological order among checkpoints of the same second.
            snap.checkpoints = [(desc, reason) for _, _, desc, reason in sorted(found)]
        return snap

    def _invalid_reason(self, dom: Any, checkpoint: Any, desc: CheckpointDesc) -> str | None:
        """None for a usable checkpoint, else why not, in libvirt's words where it has them."""
        broken = desc.broken_disks
        if not broken:
            return None
        libvirt = self.libvirt
        # Validating a redefinition of the same XML asks libvirt to check the bitmaps; it
        # fails for a broken checkpoint and then changes nothing.
        try:
            dom.checkpointCreateXML(
                checkpoint.getXMLDesc(0),
                libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE,
            )
        except libvirt.libvirtError as e:
            return str(e)
        return f"libvirt reports no usable bitmap for disk {', '.join(broken)}"

    def _create_checkpoint(self, name: str, quiesce: bool) -> CheckpointDesc:
        libvirt = self.libvirt
        dom = self._domain()
        disks = domain_disks(dom.XMLDesc(0))
        if not any(d.can_checkpoint for d in disks):
            raise LibvirtError(f"VM {self.name} has no qcow2 disk to hold a checkpoint")
        # libvirt 9.0's QEMU driver refuses VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE ("unsupported
        # flags (0x2)"): freeze through libvirt's guest agent instead, and always thaw.
        with self._frozen(dom, quiesce):
            checkpoint = dom.checkpointCreateXML(checkpoint_xml(name, disks), 0)
        return parse_checkpoint(checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))

    def _delete_checkpoint(self, name: str) -> None:
        self._domain().checkpointLookupByName(name).delete(0)

    def _delete_checkpoint_if_any(self, name: str) -> None:
        try:
            self._delete_checkpoint(name)
        except self.libvirt.libvirtError as e:
            if e.get_error_code() != self.libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                raise

    def _job_xml(self, dom: Any = None) -> str | None:
        """The running backup job's XML, None when there is none."""
        libvirt = self.libvirt
        dom = dom or self._domain()
        try:
            return str(dom.backupGetXMLDesc(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
                return None
            raise

    def _backup_begin(self, backup_doc: str, checkpoint_doc: str | None, quiesce: bool) -> None:
        dom = self._domain()
        # libvirt 9.0's backup API has no quiesce flag.
        with self._frozen(dom, quiesce):
            dom.backupBegin(backup_doc, checkpoint_doc, 0)

    @contextlib.contextmanager
    def _frozen(self, dom: Any, quiesce: bool) -> Iterator[None]:
        """The guest's filesystems frozen through libvirt's guest agent (without one the
        freeze fails and nothing was done), thawed whatever happens. The marker is written
        before the freeze and removed once libvirt confirms the thaw; ThawNotConfirmed
        otherwise (the marker stays)."""
        if not quiesce:
            yield
            return
        if self.frozen_guest.frozen:
            raise LibvirtError(
                f"--quiesce: VM {self.name}: the guest may still be frozen from an earlier "
                "--quiesce and nbdsrv is retrying its thaw; try again once `nbdsrv status` "
                "shows guest_frozen false"
            )
        self.frozen_guest.mark(domain=self.name)
        try:
            dom.fsFreeze()
        except self.libvirt.libvirtError:
            # qemu-ga undoes a freeze that fails; thaw anyway in case (no agent: fails too).
            with contextlib.suppress(self.libvirt.libvirtError):
                dom.fsThaw()
            self.frozen_guest.clear()
            raise
        crash_point("quiesce:after-freeze")
        try:
            yield
        finally:
            try:
                dom.fsThaw()
            except self.libvirt.libvirtError as e:
                raise ThawNotConfirmed(f"libvirt: {e}") from None
            self.frozen_guest.clear()

    def _thaw(self) -> None:
        self._domain().fsThaw()

    def _abort_job(self) -> None:
        libvirt = self.libvirt
        try:
            self._domain().abortJob()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job any more
                raise

    def _sizes(self, targets: list[str]) -> dict[str, int]:
        dom = self._domain()
        return {target: int(dom.blockInfo(target)[0]) for target in targets}


def bitmap_granularity(image: str | None) -> int:
    """QEMU's default bitmap granularity for a qcow2 image, the granularity libvirt's bitmaps
    get: the cluster size, clamped to 4 KiB … 64 KiB."""
    try:
        with open(image or "", "rb") as f:
            header = f.read(24)
    except OSError:
        return DEFAULT_GRANULARITY
    if len(header) < 24 or header[:4] != QCOW2_MAGIC:
        return DEFAULT_GRANULARITY
    cluster_bits: int = struct.unpack_from(">I", header, 20)[0]
    return min(max(1 << cluster_bits, 4096), DEFAULT_GRANULARITY)
