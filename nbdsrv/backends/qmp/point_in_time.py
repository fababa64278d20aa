"""Points in time of a QMP-driven VM: copy-before-write filters in QEMU, guarded by a
session record (docs/architecture.md "Holding the point in time").

begin (the VM's lock held)::

    session record (the plan)  ─►  scratch images, scratch nodes, copy-before-write filters
      ─►  checkpoint intent
      ─►  a VM (has vCPUs): [guest frozen] stop if running ─► every filter into its path
          ─► ONE transaction: frozen bitmaps, the next checkpoint ─► cont    (exact)
          a qemu-storage-daemon (cannot pause): transaction adding the next checkpoint's
          bitmap ─► ONE reopen puts every filter into its path ─► transaction disabling
          the old bitmap and adding the frozen ones          (dirty maps are supersets)
      ─►  snapshot-access nodes, QEMU exports on QEMU's NBD server  ─►  checkpoint commit
      ─►  (the session confirms: its exports are open)  record says "begun"

A begin that does not complete leaves no checkpoint behind: before the commit the intent
(which names the session) makes a failed begin or a restart roll the new checkpoint back
(merged into its parent, which records again); after it, a record not yet "begun" makes
the restart delete the checkpoint the same way (:func:`clean_stale`).

Everything is named in the record before it is created, so a failed begin, an end, or a
restart after a crash removes exactly that (qemu/fleece.py); the record stays until QEMU
holds none of it. The export deleted behind nbdsrv's back or a lost QMP connection breaks
the point in time: the session's ``on_broken`` is called. A broken snapshot (a failed copy)
shows only as failing reads: sessions learn it from their upstream reads and probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, Protocol

from ...backup.checkpoints import (
    ChainState,
    Checkpoint,
    CheckpointChain,
    CheckpointError,
    assess,
    find_layer,
    wanted_checkpoints,
)
from ...backup.crash_points import crash_point
from ...backup.store import VMStore
from ...errors import NbdsrvError
from ...proto.constants import DIRTY_BITMAP_PREFIX
from ...qemu import fleece, scratch_image
from ...qemu.block_exports import unix_uri
from ...qemu.chain import STATE_QUERIES, BlockState, block_state_of
from ...qemu.errors import QEMUError, QEMUGoneError, QMPError
from ...qemu.monitor import Monitor, QMPEvent, raise_first_error, transaction_command
from ..base import (
    BrokenCallback,
    CheckpointRef,
    PointInTime,
    PointInTimeRequest,
    UpstreamBitmap,
    UpstreamDisk,
)
from .bitmap_actions import Action
from .quiesce import QuiesceError, Quiescer
from .scratch_limit import ScratchLimit, allocated

log = logging.getLogger(__name__)


class PointInTimeHost(Protocol):
    """What the points in time of a VM use of the VM (a QmpVM): its QEMU, its store and
    settings, and the checkpoint steps a begin runs between its own."""

    name: str
    monitor: Monitor
    store: VMStore
    lock: asyncio.Lock
    roots: list[str] | None
    scratch_dir: str
    nbd_socket: str | None
    scratch_limit: int
    failure: str | None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    async def block_state(self) -> BlockState: ...

    def load_checked(self, state: ChainState) -> CheckpointChain: ...

    def plan_checkpoint(
        self, chain: CheckpointChain, state: ChainState, name: str | None, granularity: int | None
    ) -> tuple[Checkpoint, list[Action]]: ...

    async def quiescer(self, wanted: bool) -> Quiescer: ...

    def begin_create(self, checkpoint: Checkpoint, session: str | None = None) -> str: ...

    async def transaction(
        self, what: str, actions: list[Action], quiescer: Quiescer | None = None
    ) -> None: ...

    def commit_create(self, chain: CheckpointChain, checkpoint: Checkpoint, op_id: str) -> None: ...

    async def remember_counts(self, snapshot: BlockState | None = None) -> None: ...

    async def roll_back_begin(self) -> None: ...

    def has_checkpoint(self, name: str) -> bool: ...

    async def delete_checkpoint_locked(self, name: str) -> None: ...


class HeldPoint:
    """A point in time this daemon holds in QEMU now: what it put there (its plan), its
    record on disk, and what watches it (QEMU's export events, the scratch limit)."""

    def __init__(
        self,
        plan: fleece.FleecePlan,
        checkpoint: str | None,
        on_broken: BrokenCallback,
        *,
        vm_name: str,
        monitor: Monitor,
        store: VMStore,
    ) -> None:
        self.plan = plan
        self.checkpoint = checkpoint
        self.on_broken = on_broken
        self.vm_name = vm_name
        self.monitor = monitor
        self.store = store
        self.limit: ScratchLimit | None = None
        self.ending = False
        # The point in time broke and was taken out of QEMU (filters, scratch) before the end.
        self.given_up = False
        # The session confirmed its begin: from now on its checkpoint stays whatever happens.
        self.begun = False
        # This daemon no longer holds it (its record, if any, is clean_stale's).
        self.released = False
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def session(self) -> str:
        return self.plan.session

    def record(self) -> dict[str, Any]:
        return {
            "id": self.session,
            "vm": self.vm_name,
            "checkpoint": self.checkpoint,
            "begun": self.begun,
            "plan": self.plan.to_json(),
        }

    def save(self) -> None:
        self.store.write_session(self.session, self.record())

    def confirm(self) -> None:
        """The session's begin completed: its checkpoint stays from now on."""
        if not self.begun:
            self.begun = True
            self.save()

    def watch_exports(self) -> None:
        """QEMU's export of a disk deleted behind nbdsrv's back breaks the point in time."""
        exports = {d.export for d in self.plan.disks}

        def on_event(event: QMPEvent) -> None:
            if event.data.get("id") in exports and not self.ending:
                self.on_broken(f"QEMU's export {event.data.get('id')} was deleted")

        self._unsubscribe = self.monitor.subscribe("BLOCK_EXPORT_DELETED", on_event)

    @contextlib.asynccontextmanager
    async def paused(self, running: bool | None) -> AsyncIterator[None]:
        """The body with the vCPUs stopped (``stop`` drains all I/O) when the VM runs. A VM
        that was not running is left as it was: never ``cont`` what nbdsrv did not stop. The
        record says ``paused`` meanwhile, so a daemon that dies here has the next one resume
        the VM."""
        if not running:
            yield
            return
        self.plan = replace(self.plan, paused=True)
        self.save()
        await self.monitor.execute("stop")
        try:
            yield
        finally:
            await self.monitor.execute("cont")
            self.plan = replace(self.plan, paused=False)
            self.save()

    async def switch_and_freeze(self, actions: list[Action]) -> None:
        """The switch, then the transaction of ``actions``, in one round trip. Should the
        switch fail, the transaction still runs, harmlessly: the frozen bitmaps go with the
        scratch nodes, and the old checkpoint's bitmap stops recording as it would have
        anyway (a failed begin rolls the new checkpoint back, merging it into the old one,
        which then records again)."""
        switch = fleece.switch_in(self.plan.disks)
        transaction = [transaction_command(actions)] if actions else []
        answers = await self.monitor.execute_many([*switch, *transaction])
        raise_first_error(answers[: len(switch)])
        if transaction and isinstance(answers[-1], QMPError):
            e = answers[-1]
            raise CheckpointError(
                f"backup begin on VM {self.vm_name}: QEMU refused: {e.desc}"
            ) from e

    async def start_limit(self, limit: int, on_exceeded: Callable[[str], None]) -> None:
        """--scratch-limit: ``on_exceeded(reason)`` once the scratch passes ``limit``."""
        self.limit = ScratchLimit(self.monitor, self.plan, limit, on_exceeded)
        await self.limit.start()

    def scratch_bytes(self) -> int:
        """Bytes allocated in the scratch images (what copy-before-write stored)."""
        return sum(allocated(disk.scratch_file) for disk in self.plan.disks)

    async def teardown(self) -> bool:
        """Remove from QEMU and disk what the plan names; False when the QMP connection was
        lost on the way (what is left stays named in the record)."""
        self.ending = True
        if self.limit is not None:
            self.limit.stop()
        return await fleece.teardown(self.monitor, self.plan)

    async def give_up(self, lock: asyncio.Lock) -> None:
        """A broken point in time leaves QEMU at once, before `backup end` (under the VM's
        ``lock``): its filters leave the guest's write path and its scratch files are deleted
        (its readers get EIO). The end later removes what is left (QEMU's NBD server, the
        record)."""
        if self.ending or self.given_up:
            return
        self.given_up = True
        if self.limit is not None:
            self.limit.stop()
        async with lock:
            if self.ending or self.released:
                return
            try:
                freed = await fleece.give_up(self.monitor, self.plan)
            except QEMUError as e:
                log.warning("session %s: the broken point in time stays until the end: %s",
                            self.session, e)  # fmt: skip
                return
        if freed:
            log.info(
                "session %s: broken point in time taken out of QEMU: no filter in the guest's "
                "write path, scratch freed",
                self.session,
            )

    def release(self) -> None:
        """Stop watching it: this daemon no longer holds it."""
        self.released = True
        if self.limit is not None:
            self.limit.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class PointsInTime:
    """The points in time one VM holds now, by session."""

    def __init__(self, vm: PointInTimeHost) -> None:
        self.vm = vm
        self.held: dict[str, HeldPoint] = {}

    async def begin(self, request: PointInTimeRequest, on_broken: BrokenCallback) -> PointInTime:
        """Fix one point in time over every disk of the VM (hold its lock)."""
        vm = self.vm
        # One look at QEMU (three queries in one round trip) serves the chains and the switches.
        snapshot = await vm.block_state()
        state = snapshot.chains(vm.roots)
        chain = vm.load_checked(state)
        reasons = assess(chain, state)
        wanted = wanted_checkpoints(
            chain, reasons, request.from_checkpoint, request.all_checkpoints
        )
        new_checkpoint: Checkpoint | None = None
        checkpoint_actions: list[Action] = []
        if not request.no_checkpoint:
            try:
                new_checkpoint, checkpoint_actions = vm.plan_checkpoint(
                    chain, state, request.checkpoint, request.granularity
                )
            except CheckpointError as e:
                raise CheckpointError(f"{e}; --no-checkpoint backs up without creating one") from e
        switches = fleece.find_switches(snapshot, vm.roots)
        async with contextlib.aclosing(await vm.quiescer(request.quiesce)) as quiescer:
            os.makedirs(vm.scratch_dir, mode=0o700, exist_ok=True)
            plan = fleece.FleecePlan(
                session=request.session,
                nbd_socket=vm.nbd_socket or os.path.join(vm.store.directory, "fleece.sock"),
                start_nbd_server=vm.nbd_socket is None,
                disks=tuple(
                    _plan_disk(request, i, disk, layers, switches[disk], wanted, vm.scratch_dir)
                    for i, (disk, layers) in enumerate(sorted(state.items()))
                ),
            )
            held = HeldPoint(
                plan,
                new_checkpoint.name if new_checkpoint else None,
                on_broken,
                vm_name=vm.name,
                monitor=vm.monitor,
                store=vm.store,
            )
            held.save()
            self.held[request.session] = held
            committed = False
            op_id: str | None = None
            try:
                if plan.start_nbd_server:
                    await fleece.start_nbd_server(vm.monitor, plan.nbd_socket)
                for disk in plan.disks:
                    await scratch_image.create(disk.scratch_file, disk.size)
                # Every disk's scratch node and filter, and the run state, in one round trip.
                filters = [c for d in plan.disks for c in fleece.filter_commands(d)]
                added = await vm.monitor.execute_many([*filters, ("query-status", None)])
                raise_first_error(added[:-1])
                running = fleece.run_state_of(added[-1])
                crash_point("backup-begin:after-filters")
                held.watch_exports()
                freeze = [a for d in plan.disks for a in fleece.freeze_actions(d)]
                # The next checkpoint's bitmap is added before the switch and the old one
                # disabled (and the frozen ones built) after it: every dirty map is then a
                # superset whatever writes meanwhile. A running VM is stopped around it all,
                # so for its guest (whose vCPUs then issue nothing) they are exact.
                adds = [a for a in checkpoint_actions if a[0] == "block-dirty-bitmap-add"]
                rest = [a for a in checkpoint_actions if a[0] != "block-dirty-bitmap-add"]
                # The intent names the session: until the commit below, a failed begin or a
                # restart rolls the new checkpoint back (QmpVM.roll_back_create).
                if new_checkpoint:
                    op_id = vm.begin_create(new_checkpoint, request.session)
                try:
                    async with quiescer.frozen(), held.paused(running):
                        if op_id is not None:
                            await vm.transaction(f"backup begin on VM {vm.name}", adds)
                            crash_point("checkpoint-create:after-transaction")
                        await held.switch_and_freeze(freeze + rest)
                        crash_point("backup-begin:after-switch")
                except QuiesceError:
                    vm.store.clear_intent()  # the freeze failed before anything was done
                    raise
                # The exports, and a look at QEMU after them (the counts of the frozen
                # bitmaps), in one round trip.
                exports = [c for d in plan.disks for c in fleece.export_commands(d)]
                answers = await vm.monitor.execute_many([*exports, *STATE_QUERIES])
                raise_first_error(answers[: len(exports)])
                crash_point("backup-begin:after-exports")
                if new_checkpoint is not None and op_id is not None:
                    # The old checkpoint's bitmap is disabled by now: the chain is whole.
                    vm.commit_create(chain, new_checkpoint, op_id)
                    committed = True
                after = block_state_of(answers[len(exports) :])
                counts = {d.scratch_node: after.bitmap_counts(d.scratch_node) for d in plan.disks}
                # The new checkpoint's counts are the baseline for third-party checks from now.
                await vm.remember_counts(after)
            except BaseException as e:
                log.warning("VM %s: backup begin failed, cleaning up: %s", vm.name, e)
                with contextlib.suppress(NbdsrvError):
                    await self.end(request.session, drop_checkpoint=committed)
                # QEMU did not let go of it: the record stays for the next reconnect.
                self._forget(held)
                if op_id is not None and not committed:
                    await vm.roll_back_begin()
                raise
            if vm.scratch_limit:
                await held.start_limit(vm.scratch_limit, self._exceeded(held))
            return PointInTime(
                session=request.session,
                checkpoint=held.checkpoint,
                checkpoints=tuple(CheckpointRef(c.name, c.granularity) for c in wanted),
                disks=tuple(_upstream_disk(plan, d, counts[d.scratch_node]) for d in plan.disks),
                quiesced=quiescer.quiesced,
            )

    async def end(self, session: str, *, drop_checkpoint: bool = False) -> None:
        """Remove ``session``'s point in time from QEMU and disk (hold the VM's lock). When
        QEMU cannot be reached, or does not let go of it, this fails and everything stays
        (record, scratch files, the session) for the end to run again: never "ended" for work
        not done. ``drop_checkpoint`` (a begin that failed): the record goes only after the
        checkpoint, and on failure the point is left to :meth:`clean_stale` at the next
        reconnect, which deletes the checkpoint of a record not "begun"."""
        held = self.held.get(session)
        if held is None:
            return
        vm = self.vm
        try:
            if not vm.monitor.connected:
                raise QEMUGoneError(
                    f"cannot end backup session {session}: QEMU is not connected "
                    f"({vm.failure or 'no QMP connection'}); the session and its scratch files "
                    "stay: run `backup end` again once QEMU is back"
                )
            gone = await held.teardown()
            if not gone:
                raise QEMUGoneError(
                    f"cannot end backup session {session}: the QMP connection was lost; the "
                    "session and its scratch files stay: run `backup end` again once QEMU is "
                    "back"
                )
            if drop_checkpoint and held.checkpoint and vm.has_checkpoint(held.checkpoint):
                await vm.delete_checkpoint_locked(held.checkpoint)
        except NbdsrvError as e:
            log.error("session %s: cleanup in QEMU failed: %s", session, e)
            held.ending = False
            if drop_checkpoint:
                self._forget(held)  # no session to end again: the next reconnect finishes it
            raise
        self._forget(held)
        vm.store.remove_session(session)

    def _forget(self, held: HeldPoint) -> None:
        """This daemon no longer holds ``held`` (its record, if any, is clean_stale's)."""
        if self.held.get(held.session) is held:
            del self.held[held.session]
        held.release()

    def confirm(self, session: str) -> None:
        """The session's begin completed: its checkpoint stays from now on."""
        held = self.held.get(session)
        if held is not None:
            held.confirm()

    def scratch_bytes(self, session: str) -> int:
        """Bytes allocated in the session's scratch images (what copy-before-write stored)."""
        held = self.held.get(session)
        return held.scratch_bytes() if held is not None else 0

    def why_broken(self, session: str, detail: str) -> str:
        """The reason to show when reading ``session``'s point in time failed with
        ``detail``."""
        reason = f"QEMU can no longer read the point in time: {detail}"
        scratch_dir = self.vm.scratch_dir
        try:
            st = os.statvfs(scratch_dir)
        except OSError:
            return reason
        if st.f_bavail * st.f_frsize < 1 << 20:
            reason += (
                f" (the scratch directory {scratch_dir} is full: a copy-before-write failed "
                "and QEMU broke the snapshot; the guest's writes went on)"
            )
        return reason

    def _exceeded(self, held: HeldPoint) -> Callable[[str], None]:
        def exceeded(reason: str) -> None:
            held.on_broken(reason)  # first: readers get EIO before anything goes
            self.vm.spawn(self.give_up(held.session))

        return exceeded

    async def give_up(self, session: str) -> None:
        """Take ``session``'s broken point in time out of QEMU now (HeldPoint.give_up)."""
        held = self.held.get(session)
        if held is not None:
            await held.give_up(self.vm.lock)

    def broken(self, reason: str) -> None:
        """QEMU went away: no point in time of the VM holds any more."""
        for held in self.held.values():
            held.on_broken(reason)

    async def clean_stale(self) -> None:
        """Remove from QEMU the sessions a previous daemon left behind (and any session of
        ours that QEMU lost by restarting)."""
        vm = self.vm
        for record in vm.store.session_records():
            if record["id"] in self.held:
                continue
            log.info("VM %s: cleaning up stale backup session %s", vm.name, record["id"])
            plan = fleece.FleecePlan.from_json(record["plan"])
            try:
                async with vm.lock:
                    await self._drop_unconfirmed_checkpoint(record)
                    gone = await fleece.teardown(vm.monitor, plan)
            except NbdsrvError as e:
                log.error("VM %s: stale session %s stays: %s", vm.name, record["id"], e)
                continue
            if gone:
                vm.store.remove_session(record["id"])

    async def _drop_unconfirmed_checkpoint(self, record: dict[str, Any]) -> None:
        """A begin that did not complete leaves no checkpoint behind: delete the one it
        committed (merged into its parent). Records of older nbdsrv versions have no "begun":
        their checkpoints stay."""
        vm = self.vm
        name = record.get("checkpoint")
        if record.get("begun", True) or not name or not vm.has_checkpoint(name):
            return
        log.info("VM %s: deleting checkpoint %s of the unfinished backup begin %s",
                 vm.name, name, record["id"])  # fmt: skip
        await vm.delete_checkpoint_locked(name)
        # Deleted: a kill from here on must not delete it again (the name may be reused).
        vm.store.write_session(record["id"], {**record, "checkpoint": None})


def _upstream_disk(
    plan: fleece.FleecePlan, disk: fleece.DiskPlan, counts: dict[str, int]
) -> UpstreamDisk:
    return UpstreamDisk(
        disk=disk.disk,
        size=disk.size,
        socket=plan.nbd_socket,
        export=disk.export,
        direct_uri=unix_uri(disk.direct_export, plan.nbd_socket) if disk.direct_export else None,
        bitmaps=tuple(
            UpstreamBitmap(
                checkpoint=checkpoint,
                context=DIRTY_BITMAP_PREFIX + name,
                granularity=granularity,
                dirty_bytes=counts.get(name),
            )
            for name, (checkpoint, granularity, _) in disk.bitmaps.items()
        ),
    )


def _plan_disk(
    request: PointInTimeRequest,
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
        request.session,
        index,
        disk,
        top.node_name,
        top.virtual_size,
        scratch_dir,
        switch,
        bitmaps,
        direct_contexts(request, wanted, {name for name, _, _ in bitmaps}),
    )


def direct_contexts(
    request: PointInTimeRequest, wanted: Sequence[Checkpoint], frozen: set[str]
) -> dict[str, str]:
    """The dirty-bitmap contexts of a disk's direct export, as the relay offers them
    (backup/sessions.py): context suffix → checkpoint. ``frozen``: the checkpoints the disk
    has a frozen bitmap of. A context for which the disk lacks some checkpoint's bitmap (a
    disk added since) is all dirty on the relay; QEMU cannot fill a bitmap, so the direct
    export leaves that context out."""
    names = [c.name for c in wanted] if request.all_checkpoints else []
    if not request.all_checkpoints and request.from_checkpoint:
        names = [request.from_checkpoint]
    contexts: dict[str, str] = {}
    for i, checkpoint in enumerate(wanted):
        if checkpoint.name in names and {c.name for c in wanted[i:]} <= frozen:
            contexts[request.bitmap_name or checkpoint.name] = checkpoint.name
    return contexts
