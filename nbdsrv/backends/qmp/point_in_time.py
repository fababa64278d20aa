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

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ...backup.checkpoints import (
    Checkpoint,
    CheckpointError,
    assess,
    find_layer,
    wanted_checkpoints,
)
from ...backup.crash_points import crash_point
from ...errors import NbdsrvError
from ...proto.constants import DIRTY_BITMAP_PREFIX
from ...qemu import fleece, scratch_image
from ...qemu.block_exports import unix_uri
from ...qemu.chain import STATE_QUERIES, block_state_of
from ...qemu.errors import QEMUError, QEMUGoneError, QMPError
from ...qemu.monitor import QMPEvent, raise_first_error, transaction_command
from ..base import (
    BrokenCallback,
    CheckpointRef,
    PointInTime,
    PointInTimeRequest,
    UpstreamBitmap,
    UpstreamDisk,
)
from .quiesce import QuiesceError
from .scratch_limit import ScratchLimit

if TYPE_CHECKING:
    from .vm import QmpVM

log = logging.getLogger(__name__)


@dataclass
class HeldPoint:
    """A point in time this daemon holds in QEMU now."""

    plan: fleece.FleecePlan
    checkpoint: str | None
    on_broken: BrokenCallback
    unsubscribe: Any = None
    limit: ScratchLimit | None = None
    ending: bool = False
    # The point in time broke and was taken out of QEMU (filters, scratch) before the end.
    given_up: bool = False
    # The session confirmed its begin: from now on its checkpoint stays whatever happens.
    begun: bool = False


async def begin(vm: QmpVM, request: PointInTimeRequest, on_broken: BrokenCallback) -> PointInTime:
    """Fix one point in time over every disk of ``vm`` (hold ``vm.lock``)."""
    # One look at QEMU (three queries in one round trip) serves the chains and the switches.
    snapshot = await vm.block_state()
    state = snapshot.chains(vm.roots)
    chain = vm.load_checked(state)
    reasons = assess(chain, state)
    wanted = wanted_checkpoints(chain, reasons, request.from_checkpoint, request.all_checkpoints)
    new_checkpoint: Checkpoint | None = None
    checkpoint_actions: list[tuple[str, dict[str, Any]]] = []
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
        held = HeldPoint(plan, new_checkpoint.name if new_checkpoint else None, on_broken)
        vm.store.write_session(request.session, _record(vm, held))
        vm.points[request.session] = held
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
            held.unsubscribe = vm.monitor.subscribe("BLOCK_EXPORT_DELETED", _export_event(held))
            freeze = [a for d in plan.disks for a in fleece.freeze_actions(d)]
            # The next checkpoint's bitmap is added before the switch and the old one
            # disabled (and the frozen ones built) after it: every dirty map is then a
            # superset whatever writes meanwhile. A running VM is stopped around it all, so
            # for its guest (whose vCPUs then issue nothing) they are exact.
            adds = [a for a in checkpoint_actions if a[0] == "block-dirty-bitmap-add"]
            rest = [a for a in checkpoint_actions if a[0] != "block-dirty-bitmap-add"]
            # The intent names the session: until the commit below, a failed begin or a
            # restart rolls the new checkpoint back (vm.roll_back_create).
            op_id = vm.begin_create(new_checkpoint, request.session) if new_checkpoint else None
            try:
                async with quiescer.frozen(), _paused(vm, held, running):
                    if op_id is not None:
                        await vm.transaction(f"backup begin on VM {vm.name}", adds)
                        crash_point("checkpoint-create:after-transaction")
                    await _switch_and_freeze(vm, plan.disks, freeze + rest)
                    crash_point("backup-begin:after-switch")
            except QuiesceError:
                vm.store.clear_intent()  # the freeze failed before anything was done
                raise
            # The exports, and a look at QEMU after them (the counts of the frozen bitmaps),
            # in one round trip.
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
                await end(vm, request.session, drop_checkpoint=committed)
            # QEMU did not let go of it: the record stays for the next reconnect.
            _forget(vm, held)
            if op_id is not None and not committed:
                await _roll_back_checkpoint(vm)
            raise
        if vm.scratch_limit:
            held.limit = ScratchLimit(vm, held, vm.scratch_limit, _exceeded(vm, held))
            await held.limit.start()
        return PointInTime(
            session=request.session,
            checkpoint=held.checkpoint,
            checkpoints=tuple(CheckpointRef(c.name, c.granularity) for c in wanted),
            disks=tuple(_upstream_disk(plan, d, counts[d.scratch_node]) for d in plan.disks),
            quiesced=quiescer.quiesced,
        )


async def _roll_back_checkpoint(vm: QmpVM) -> None:
    """Undo the new checkpoint of a failed begin (its intent is on disk). When QEMU cannot
    be reached the intent stays: the next reconcile rolls it back."""
    intent = vm.store.read_intent()
    if intent is None:
        return  # QEMU refused the transaction that adds it: nothing was done
    try:
        state = await vm.chains()
        await vm.roll_back_create(intent, vm.load()[0], state)
    except (QEMUError, QEMUGoneError) as e:
        log.error("VM %s: the new checkpoint is rolled back later: %s", vm.name, e)
        return
    vm.store.clear_intent()


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


def _export_event(held: HeldPoint) -> Any:
    exports = {d.export for d in held.plan.disks}

    def on_event(event: QMPEvent) -> None:
        if event.data.get("id") in exports and not held.ending:
            held.on_broken(f"QEMU's export {event.data.get('id')} was deleted")

    return on_event


@contextlib.asynccontextmanager
async def _paused(vm: QmpVM, held: HeldPoint, running: bool | None) -> AsyncIterator[None]:
    """The body with the vCPUs stopped (``stop`` drains all I/O) when the VM runs. A VM that
    was not running is left as it was: never ``cont`` what nbdsrv did not stop. The record
    says ``paused`` meanwhile, so a daemon that dies here has the next one resume the VM."""
    if not running:
        yield
        return
    held.plan = replace(held.plan, paused=True)
    vm.store.write_session(held.plan.session, _record(vm, held))
    await vm.monitor.execute("stop")
    try:
        yield
    finally:
        await vm.monitor.execute("cont")
        held.plan = replace(held.plan, paused=False)
        vm.store.write_session(held.plan.session, _record(vm, held))


async def _switch_and_freeze(
    vm: QmpVM, disks: Sequence[fleece.DiskPlan], actions: list[tuple[str, dict[str, Any]]]
) -> None:
    """The switch, then the transaction of ``actions``, in one round trip. Should the
    switch fail, the transaction still runs, harmlessly: the frozen bitmaps go with the
    scratch nodes, and the old checkpoint's bitmap stops recording as it would have anyway
    (a failed begin rolls the new checkpoint back, merging it into the old one, which then
    records again)."""
    switch = fleece.switch_in(disks)
    transaction = [transaction_command(actions)] if actions else []
    answers = await vm.monitor.execute_many([*switch, *transaction])
    raise_first_error(answers[: len(switch)])
    if transaction and isinstance(answers[-1], QMPError):
        e = answers[-1]
        raise CheckpointError(f"backup begin on VM {vm.name}: QEMU refused: {e.desc}") from e


async def end(vm: QmpVM, session: str, *, drop_checkpoint: bool = False) -> None:
    """Remove ``session``'s point in time from QEMU and disk (hold ``vm.lock``). When QEMU
    cannot be reached, or does not let go of it, this fails and everything stays (record,
    scratch files, the session) for the end to run again: never "ended" for work not done.
    ``drop_checkpoint`` (a begin that failed): the record goes only after the checkpoint,
    and on failure the point is left to :func:`clean_stale` at the next reconnect, which
    deletes the checkpoint of a record not "begun"."""
    held = vm.points.get(session)
    if held is None:
        return
    try:
        if not vm.monitor.connected:
            raise QEMUGoneError(
                f"cannot end backup session {session}: QEMU is not connected "
                f"({vm.failure or 'no QMP connection'}); the session and its scratch files "
                "stay: run `backup end` again once QEMU is back"
            )
        held.ending = True
        if held.limit is not None:
            held.limit.stop()
        gone = await fleece.teardown(vm.monitor, held.plan)
        if not gone:
            raise QEMUGoneError(
                f"cannot end backup session {session}: the QMP connection was lost; the "
                "session and its scratch files stay: run `backup end` again once QEMU is back"
            )
        if drop_checkpoint and held.checkpoint and vm.load()[0].has(held.checkpoint):
            await vm.delete_checkpoint_locked(held.checkpoint)
    except NbdsrvError as e:
        log.error("session %s: cleanup in QEMU failed: %s", session, e)
        held.ending = False
        if drop_checkpoint:
            _forget(vm, held)  # no session to end again: the next reconnect finishes it
        raise
    _forget(vm, held)
    vm.store.remove_session(session)


def _forget(vm: QmpVM, held: HeldPoint) -> None:
    """This daemon no longer holds ``held`` (its record, if any, is clean_stale's)."""
    if vm.points.get(held.plan.session) is held:
        del vm.points[held.plan.session]
    if held.limit is not None:
        held.limit.stop()
    if held.unsubscribe is not None:
        held.unsubscribe()
        held.unsubscribe = None


def why_broken(vm: QmpVM, session: str, detail: str) -> str:
    """The reason to show when reading ``session``'s point in time failed with ``detail``."""
    reason = f"QEMU can no longer read the point in time: {detail}"
    try:
        st = os.statvfs(vm.scratch_dir)
    except OSError:
        return reason
    if st.f_bavail * st.f_frsize < 1 << 20:
        reason += (
            f" (the scratch directory {vm.scratch_dir} is full: a copy-before-write failed "
            "and QEMU broke the snapshot; the guest's writes went on)"
        )
    return reason


def scratch_bytes(vm: QmpVM, session: str) -> int:
    """Bytes allocated in the session's scratch images (what copy-before-write stored)."""
    held = vm.points.get(session)
    total = 0
    for disk in held.plan.disks if held else ():
        with contextlib.suppress(OSError):
            total += os.stat(disk.scratch_file).st_blocks * 512
    return total


def _exceeded(vm: QmpVM, held: HeldPoint) -> Callable[[str], None]:
    def exceeded(reason: str) -> None:
        held.on_broken(reason)  # first: readers get EIO before anything goes
        vm._spawn(give_up(vm, held.plan.session))

    return exceeded


async def give_up(vm: QmpVM, session: str) -> None:
    """A broken point in time leaves QEMU at once, before `backup end`: its filters leave
    the guest's write path and its scratch files are deleted (its readers get EIO). The
    end later removes what is left (QEMU's NBD server, the record)."""
    held = vm.points.get(session)
    if held is None or held.ending or held.given_up:
        return
    held.given_up = True
    if held.limit is not None:
        held.limit.stop()
    async with vm.lock:
        if held.ending or vm.points.get(session) is not held:
            return
        try:
            freed = await fleece.give_up(vm.monitor, held.plan)
        except QEMUError as e:
            log.warning("session %s: the broken point in time stays until the end: %s",
                        session, e)  # fmt: skip
            return
    if freed:
        log.info(
            "session %s: broken point in time taken out of QEMU: no filter in the guest's "
            "write path, scratch freed",
            session,
        )


def broken(vm: QmpVM, reason: str) -> None:
    """QEMU went away: no point in time of ``vm`` holds any more."""
    for held in vm.points.values():
        held.on_broken(reason)


async def clean_stale(vm: QmpVM) -> None:
    """Remove from QEMU the sessions a previous daemon left behind (and any session of
    ours that QEMU lost by restarting)."""
    for record in vm.store.session_records():
        if record["id"] in vm.points:
            continue
        log.info("VM %s: cleaning up stale backup session %s", vm.name, record["id"])
        plan = fleece.FleecePlan.from_json(record["plan"])
        try:
            async with vm.lock:
                await _drop_unconfirmed_checkpoint(vm, record)
                gone = await fleece.teardown(vm.monitor, plan)
        except NbdsrvError as e:
            log.error("VM %s: stale session %s stays: %s", vm.name, record["id"], e)
            continue
        if gone:
            vm.store.remove_session(record["id"])


async def _drop_unconfirmed_checkpoint(vm: QmpVM, record: dict[str, Any]) -> None:
    """A begin that did not complete leaves no checkpoint behind: delete the one it
    committed (merged into its parent). Records of older nbdsrv versions have no "begun":
    their checkpoints stay."""
    name = record.get("checkpoint")
    if record.get("begun", True) or not name or not vm.load()[0].has(name):
        return
    log.info("VM %s: deleting checkpoint %s of the unfinished backup begin %s",
             vm.name, name, record["id"])  # fmt: skip
    await vm.delete_checkpoint_locked(name)
    # Deleted: a kill from here on must not delete it again (the name may be reused).
    vm.store.write_session(record["id"], {**record, "checkpoint": None})


def _record(vm: QmpVM, held: HeldPoint) -> dict[str, Any]:
    return {
        "id": held.plan.session,
        "vm": vm.name,
        "checkpoint": held.checkpoint,
        "begun": held.begun,
        "plan": held.plan.to_json(),
    }


def confirm(vm: QmpVM, session: str) -> None:
    """The session's begin completed: its checkpoint stays from now on."""
    held = vm.points.get(session)
    if held is not None and not held.begun:
        held.begun = True
        vm.store.write_session(session, _record(vm, held))


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
