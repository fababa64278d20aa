"""Pull-mode backup sessions: one point in time over every disk of a VM, exported read-only.

begin (one VM lock held throughout; the point-in-time parts are in nbdsrv/qemu/fleece.py)::

    session record (the plan)  ─►  scratch images, scratch nodes, copy-before-write filters
      ─►  checkpoint intent
      ─►  a VM (has vCPUs): stop if running ─► every filter into its path ─► ONE transaction:
          frozen bitmaps, the next checkpoint ─► cont if nbdsrv stopped it        (exact)
          a qemu-storage-daemon (cannot pause): transaction adding the next checkpoint's
          bitmap ─► ONE reopen puts every filter into its path ─► transaction disabling the
          old one and adding the frozen bitmaps          (dirty maps are supersets: safe)
      ─►  checkpoint commit  ─►  snapshot-access nodes, QEMU exports  ─►  bitmaps read into
          memory, OR-merged  ─►  VM/DISK exports on every listener

Any failure on the way tears down what exists and, when the checkpoint was committed,
deletes it again: a failed begin leaves nothing behind. end — and daemon stop — remove the
exports (clients get ESHUTDOWN), then everything in the plan from QEMU and disk. The record
stays until QEMU holds none of it (QEMU unreachable: cleaned when it reconnects).

A session breaks when QEMU can no longer read its point in time (a copy into the scratch
image failed: QEMU then fails every snapshot read and says nothing on QMP), when QEMU's
export goes away, or when QEMU is lost. nbdsrv learns it from a failed upstream read or
from a one-sector probe read every PROBE_INTERVAL; the session is then "failed" with the
reason, and its readers get EIO.
"""

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..backends.qmp.vm import VM
from ..errors import NbdsrvError, NotFoundError
from ..exports.catalog import ExportCatalog
from ..exports.dirty_bitmap import DirtyBitmap
from ..exports.upstream import UpstreamExport, fetch_bitmap
from ..net.address import Address
from ..proto.constants import DIRTY_BITMAP_PREFIX
from ..qemu import fleece
from ..qemu.errors import QEMUError, QMPError
from ..qemu.monitor import QMPEvent
from .checkpoints import (
    Checkpoint,
    CheckpointChain,
    CheckpointError,
    assess,
    find_layer,
    now_iso,
)
from .crash_points import crash_point

log = logging.getLogger(__name__)

# Seconds between the probe reads that find a broken point in time without a reader.
PROBE_INTERVAL = 1.0


class SessionError(NbdsrvError):
    """A backup session cannot begin or end as asked."""


@dataclass(frozen=True)
class BeginRequest:
    vm: str
    from_checkpoint: str | None = None
    checkpoint: str | None = None
    no_checkpoint: bool = False
    all_checkpoints: bool = False
    bitmap_name: str | None = None
    granularity: int | None = None


@dataclass
class Session:
    id: str
    vm: VM
    created: str
    checkpoint: str | None
    from_checkpoint: str | None
    plan: fleece.FleecePlan
    exports: dict[str, UpstreamExport] = field(default_factory=dict)
    state: str = "running"
    error: str | None = None
    ending: bool = False
    unsubscribe: Any = None
    watcher: "asyncio.Task[None] | None" = None

    def fail(self, reason: str) -> None:
        if self.state == "running":
            self.state = "failed"
            self.error = reason
            log.error("session %s of VM %s failed: %s", self.id, self.vm.name, reason)
        for export in self.exports.values():
            export.fail(reason)


class SessionManager:
    """Every running backup session of the daemon."""

    def __init__(
        self, catalog: ExportCatalog, scratch_dir: str, addresses: Sequence[Address]
    ) -> None:
        self.catalog = catalog
        self.scratch_dir = scratch_dir
        self.addresses = addresses
        self.sessions: dict[str, Session] = {}

    def _of_vm(self, vm: VM) -> list[Session]:
        return [s for s in self.sessions.values() if s.vm is vm]

    def find(self, vm: VM, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.vm is not vm:
            raise NotFoundError(f"VM {vm.name} has no backup session '{session_id}'")
        return session

    # -- begin ----------------------------------------------------------------------------

    async def begin(self, vm: VM, request: BeginRequest) -> Session:
        if request.no_checkpoint and request.checkpoint:
            raise SessionError("--checkpoint and --no-checkpoint exclude each other")
        if request.bitmap_name and not request.from_checkpoint:
            raise SessionError("--bitmap-name names the --from context: give --from too")
        if request.bitmap_name and request.all_checkpoints:
            raise SessionError("--bitmap-name cannot be combined with --all-checkpoints")
        if self._of_vm(vm):
            raise SessionError(f"VM {vm.name} already has a backup session running")
        if not vm.monitor.connected:
            raise SessionError(f"VM {vm.name}: QEMU is not connected")
        async with vm.lock:
            if self._of_vm(vm):
                raise SessionError(f"VM {vm.name} already has a backup session running")
            return await self._begin_locked(vm, request)

    async def _begin_locked(self, vm: VM, request: BeginRequest) -> Session:
        state = await vm.chains()
        chain = vm.load_checked(state)
        reasons = assess(chain, state)
        wanted = _wanted_checkpoints(chain, reasons, request)
        new_checkpoint: Checkpoint | None = None
        checkpoint_actions: list[tuple[str, dict[str, Any]]] = []
        if not request.no_checkpoint:
            try:
                new_checkpoint, checkpoint_actions = vm.plan_checkpoint(
                    chain, state, request.checkpoint, request.granularity
                )
            except CheckpointError as e:
                raise CheckpointError(f"{e}; --no-checkpoint backs up without creating one") from e
        switches = await fleece.find_switches(vm.monitor, vm.roots)
        session_id = uuid.uuid4().hex[:12]
        os.makedirs(self.scratch_dir, mode=0o700, exist_ok=True)
        plan = fleece.FleecePlan(
            session=session_id,
            nbd_socket=vm.nbd_socket or os.path.join(vm.store.directory, "fleece.sock"),
            start_nbd_server=vm.nbd_socket is None,
            disks=tuple(
                _plan_disk(session_id, i, disk, layers, switches[disk], wanted, self.scratch_dir)
                for i, (disk, layers) in enumerate(sorted(state.items()))
            ),
        )
        session = Session(
            id=session_id,
            vm=vm,
            created=now_iso(),
            checkpoint=new_checkpoint.name if new_checkpoint else None,
            from_checkpoint=request.from_checkpoint,
            plan=plan,
        )
        vm.store.write_session(session_id, self._record(session))
        committed = False
        try:
            if plan.start_nbd_server:
                await fleece.start_nbd_server(vm.monitor, plan.nbd_socket)
            for disk in plan.disks:
                await fleece.create_scratch_image(disk.scratch_file, disk.size)
                await fleece.add_filter(vm.monitor, disk)
            session.unsubscribe = vm.monitor.subscribe(
                "BLOCK_EXPORT_DELETED", self._export_event(session)
            )
            freeze = [a for d in plan.disks for a in fleece.freeze_actions(d)]
            running = await fleece.run_state(vm.monitor)
            op_id = vm.begin_create(new_checkpoint) if new_checkpoint else None
            if running is None:
                # Nothing can pause the writers: keep every dirty map a superset (the new
                # bitmap records from before the switch, the frozen ones until after it).
                adds = [a for a in checkpoint_actions if a[0] == "block-dirty-bitmap-add"]
                rest = [a for a in checkpoint_actions if a[0] != "block-dirty-bitmap-add"]
                if new_checkpoint is not None and op_id is not None:
                    await vm.transaction(f"backup begin on VM {vm.name}", adds)
                    vm.commit_create(chain, new_checkpoint, op_id)
                    committed = True
                await fleece.switch_in(vm.monitor, plan.disks)
                crash_point("backup-begin:after-switch")
                await self._transaction(vm, freeze + rest)
            else:
                await self._paused_switch(session, running, freeze + checkpoint_actions)
                if new_checkpoint is not None and op_id is not None:
                    vm.commit_create(chain, new_checkpoint, op_id)
                    committed = True
            for disk in plan.disks:
                await fleece.add_export(vm.monitor, disk)
            crash_point("backup-begin:after-exports")
            await self._open_exports(session, request, wanted)
        except BaseException as e:
            log.warning("VM %s: backup begin failed, cleaning up: %s", vm.name, e)
            with contextlib.suppress(QEMUError):
                await self._teardown(session)
            if committed and session.checkpoint and vm.monitor.connected:
                await vm.delete_checkpoint_locked(session.checkpoint)
            raise
        self.sessions[session_id] = session
        session.watcher = asyncio.create_task(
            self._probe(session), name=f"session-probe {session_id}"
        )
        log.info(
            "VM %s: backup session %s begun (checkpoint %s, from %s)",
            vm.name, session_id, session.checkpoint, request.from_checkpoint,
        )  # fmt: skip
        return session

    async def _paused_switch(
        self, session: Session, running: bool, actions: list[tuple[str, dict[str, Any]]]
    ) -> None:
        """Switch every disk and run ``actions`` with the vCPUs stopped (``stop`` drains all
        I/O), so the point in time and the bitmaps are one exact instant. A VM that was not
        running is left as it was: never ``cont`` what nbdsrv did not stop."""
        vm = session.vm
        if running:
            session.plan = replace(session.plan, paused=True)
            vm.store.write_session(session.id, self._record(session))
            await vm.monitor.execute("stop")
        try:
            await fleece.switch_in(vm.monitor, session.plan.disks)
            crash_point("backup-begin:after-switch")  # a VM nbdsrv stopped stays stopped
            if actions:
                await vm.transaction(f"backup begin on VM {vm.name}", actions)
        finally:
            if running:
                await vm.monitor.execute("cont")
                session.plan = replace(session.plan, paused=False)
                vm.store.write_session(session.id, self._record(session))

    @staticmethod
    async def _transaction(vm: VM, actions: list[tuple[str, dict[str, Any]]]) -> None:
        if not actions:
            return
        try:
            await vm.monitor.transaction(actions)
        except QMPError as e:
            raise SessionError(f"backup begin on VM {vm.name}: QEMU refused: {e.desc}") from e

    def _export_event(self, session: Session) -> Any:
        exports = {d.export for d in session.plan.disks}

        def on_event(event: QMPEvent) -> None:
            if event.data.get("id") in exports and not session.ending:
                session.fail(f"QEMU's export {event.data.get('id')} was deleted")

        return on_event

    def _broken(self, session: Session) -> Any:
        def on_failure(detail: str) -> None:
            if session.ending:
                return
            reason = f"QEMU can no longer read the point in time: {detail}"
            free = _free_bytes(self.scratch_dir)
            if free is not None and free < 1 << 20:
                reason += (
                    f" (the scratch directory {self.scratch_dir} is full: a copy-before-write "
                    "failed and QEMU broke the snapshot; the guest's writes went on)"
                )
            session.fail(reason)

        return on_failure

    async def _probe(self, session: Session) -> None:
        """Find a broken point in time without waiting for a reader."""
        while session.state == "running" and not session.ending:
            await asyncio.sleep(PROBE_INTERVAL)
            for export in list(session.exports.values()):
                if session.state != "running" or session.ending:
                    return
                await export.probe()

    async def _open_exports(
        self, session: Session, request: BeginRequest, wanted: list[Checkpoint]
    ) -> None:
        vm, plan = session.vm, session.plan
        address = Address("unix", path=plan.nbd_socket)
        counts_by_node = {
            d.scratch_node: await fleece.bitmap_counts(vm.monitor, d.scratch_node)
            for d in plan.disks
        }
        for disk in plan.disks:
            frozen: dict[str, DirtyBitmap] = {}
            for name, (ckpt, granularity, _) in disk.bitmaps.items():
                bitmap = await fetch_bitmap(
                    address, disk.export, DIRTY_BITMAP_PREFIX + name, disk.size, granularity
                )
                expected = counts_by_node[disk.scratch_node].get(name)
                if expected != bitmap.dirty_bytes:
                    raise SessionError(
                        f"bitmap {ckpt} of disk {disk.disk}: read {bitmap.dirty_bytes} dirty "
                        f"bytes over NBD but QEMU counts {expected}"
                    )
                frozen[ckpt] = bitmap
            contexts = _since_contexts(wanted, frozen, disk.size, request)
            export = UpstreamExport(
                f"{vm.name}/{disk.disk}",
                disk.size,
                address,
                disk.export,
                contexts,
                description=f"VM {vm.name} disk {disk.disk}, backup session {session.id}",
                on_failure=self._broken(session),
            )
            await export.open()
            session.exports[disk.disk] = export
        for export in session.exports.values():
            self.catalog.add(export)

    # -- end ------------------------------------------------------------------------------

    async def end(self, vm: VM, session_id: str) -> None:
        session = self.find(vm, session_id)
        async with vm.lock:
            await self._teardown(session)
        self.sessions.pop(session_id, None)
        log.info("VM %s: backup session %s ended", vm.name, session_id)

    async def _teardown(self, session: Session) -> None:
        """Close the session's exports, then remove it from QEMU. The record goes only when
        QEMU holds nothing of it any more; QEMU unreachable: the next reconnect cleans it."""
        session.ending = True
        if session.watcher is not None and session.watcher is not asyncio.current_task():
            session.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.watcher
        for export in session.exports.values():
            if self.catalog.find_export(export.name) is export:
                self.catalog.remove(export.name)
            await export.aclose()
        if session.unsubscribe is not None:
            session.unsubscribe()
        try:
            gone = await fleece.teardown(session.vm.monitor, session.plan)
        except QEMUError as e:
            log.error("session %s: cleanup in QEMU failed: %s", session.id, e)
            raise
        if gone:
            session.vm.store.remove_session(session.id)
        else:
            log.warning(
                "session %s: QEMU is not connected; its nodes and files are removed when it "
                "reconnects",
                session.id,
            )

    async def end_all(self) -> None:
        for session in list(self.sessions.values()):
            try:
                await self.end(session.vm, session.id)
            except NbdsrvError as e:
                log.error("session %s: %s", session.id, e)

    async def clean_stale(self, vm: VM) -> None:
        """Remove from QEMU the sessions a previous daemon left behind (and any session of
        ours that QEMU lost by restarting)."""
        live = {s.id for s in self._of_vm(vm)}
        for record in vm.store.session_records():
            if record["id"] in live:
                continue
            log.info("VM %s: cleaning up stale backup session %s", vm.name, record["id"])
            plan = fleece.FleecePlan.from_json(record["plan"])
            try:
                gone = await fleece.teardown(vm.monitor, plan)
            except QEMUError as e:
                log.error("VM %s: stale session %s stays: %s", vm.name, record["id"], e)
                continue
            if gone:
                vm.store.remove_session(record["id"])

    # -- views ----------------------------------------------------------------------------

    def _record(self, session: Session) -> dict[str, Any]:
        return {
            "id": session.id,
            "vm": session.vm.name,
            "created": session.created,
            "checkpoint": session.checkpoint,
            "from": session.from_checkpoint,
            "plan": session.plan.to_json(),
        }

    def describe(self, session: Session) -> dict[str, Any]:
        disks = {}
        for disk, export in session.exports.items():
            disks[disk] = {
                "export": export.name,
                "uri": self.addresses[0].uri(export.name) if self.addresses else None,
                "uris": [a.uri(export.name) for a in self.addresses],
                "contexts": list(export.contexts),
                "size": export.size,
            }
        return {
            "id": session.id,
            "vm": session.vm.name,
            "checkpoint": session.checkpoint,
            "from": session.from_checkpoint,
            "created": session.created,
            "state": session.state,
            "error": session.error,
            "disks": disks,
        }


def _wanted_checkpoints(
    chain: CheckpointChain, reasons: dict[str, str | None], request: BeginRequest
) -> list[Checkpoint]:
    """The checkpoints whose frozen bitmaps the session needs, oldest first."""
    if request.from_checkpoint:
        start = chain.find(request.from_checkpoint)
        if reasons[start.name] is not None:
            raise CheckpointError(
                f"checkpoint '{start.name}' cannot be used: {reasons[start.name]}; "
                "take a full backup"
            )
    valid = [c for c in chain if reasons[c.name] is None]
    if request.all_checkpoints:
        return valid
    if request.from_checkpoint:
        return chain.since(request.from_checkpoint)
    return []


def _plan_disk(
    session_id: str,
    index: int,
    disk: str,
    layers: Sequence[Any],
    switch: fleece.Switch,
    wanted: list[Checkpoint],
    scratch_dir: str,
) -> fleece.DiskPlan:
    top = layers[0]
    bitmaps = []
    for checkpoint in wanted:
        sources = []
        for segment in checkpoint.disks.get(disk, ()):
            layer = find_layer(layers, segment.file)
            if layer is not None:
                sources.append((layer.node_name, segment.bitmap))
        if sources:
            bitmaps.append((checkpoint.name, checkpoint.granularity, sources))
    return fleece.plan_disk(
        session_id, index, disk, top.node_name, top.virtual_size, scratch_dir, switch, bitmaps
    )


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _since_contexts(
    wanted: list[Checkpoint],
    frozen: dict[str, DirtyBitmap],
    size: int,
    request: BeginRequest,
) -> dict[str, DirtyBitmap]:
    """Context name → "changed since C", by OR-ing each checkpoint's frozen bitmap into all
    older ones (suffix OR, newest first). A disk without a bitmap for some checkpoint (added
    later) is all dirty since then: never claim clean what nobody watched."""
    since: dict[str, DirtyBitmap] = {}
    later: DirtyBitmap | None = None
    for checkpoint in reversed(wanted):
        own = frozen.get(checkpoint.name)
        if own is None:
            own = DirtyBitmap(size, checkpoint.granularity)
            own.bits.setall(1)
        merged = own if later is None else _or(own, later)
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
