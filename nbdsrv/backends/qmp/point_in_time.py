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
      ─►  checkpoint commit  ─►  snapshot-access nodes, QEMU exports on QEMU's NBD server

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
from collections.abc import AsyncIterator, Sequence
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
from ...proto.constants import DIRTY_BITMAP_PREFIX
from ...qemu import fleece, scratch_image
from ...qemu.chain import STATE_QUERIES, block_state_of
from ...qemu.errors import QEMUError, QMPError
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

if TYPE_CHECKING:
    from .vm import QmpVM

log = logging.getLogger(__name__)

SCRATCH_POLL = 0.5


@dataclass
class HeldPoint:
    """A point in time this daemon holds in QEMU now."""

    plan: fleece.FleecePlan
    checkpoint: str | None
    on_broken: BrokenCallback
    unsubscribe: Any = None
    watcher: asyncio.Task[None] | None = None
    ending: bool = False


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
                _plan_disk(request.session, i, disk, layers, switches[disk], wanted, vm.scratch_dir)
                for i, (disk, layers) in enumerate(sorted(state.items()))
            ),
        )
        held = HeldPoint(plan, new_checkpoint.name if new_checkpoint else None, on_broken)
        vm.store.write_session(request.session, _record(vm, held))
        vm.points[request.session] = held
        committed = False
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
            op_id = vm.begin_create(new_checkpoint) if new_checkpoint else None
            try:
                async with quiescer.frozen(), _paused(vm, held, running):
                    if new_checkpoint is not None and op_id is not None:
                        await vm.transaction(f"backup begin on VM {vm.name}", adds)
                        vm.commit_create(chain, new_checkpoint, op_id)
                        committed = True
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
            after = block_state_of(answers[len(exports) :])
            counts = {d.scratch_node: after.bitmap_counts(d.scratch_node) for d in plan.disks}
            # The new checkpoint's counts are the baseline for third-party checks from now.
            await vm.remember_counts(after)
        except BaseException as e:
            log.warning("VM %s: backup begin failed, cleaning up: %s", vm.name, e)
            with contextlib.suppress(QEMUError):
                await end(vm, request.session, drop_checkpoint=committed)
            raise
        if vm.scratch_limit:
            held.watcher = asyncio.create_task(_watch_scratch(vm, held, vm.scratch_limit))
        return PointInTime(
            session=request.session,
            checkpoint=held.checkpoint,
            checkpoints=tuple(CheckpointRef(c.name, c.granularity) for c in wanted),
            disks=tuple(_upstream_disk(plan, d, counts[d.scratch_node]) for d in plan.disks),
            quiesced=quiescer.quiesced,
        )


def _upstream_disk(
    plan: fleece.FleecePlan, disk: fleece.DiskPlan, counts: dict[str, int]
) -> UpstreamDisk:
    return UpstreamDisk(
        disk=disk.disk,
        size=disk.size,
        socket=plan.nbd_socket,
        export=disk.export,
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
    scratch nodes, and the old checkpoint's bitmap stops recording as it would have anyway,
    the new checkpoint being committed already (a failed begin deletes it again, merging
    it back)."""
    switch = fleece.switch_in(disks)
    transaction = [transaction_command(actions)] if actions else []
    answers = await vm.monitor.execute_many([*switch, *transaction])
    raise_first_error(answers[: len(switch)])
    if transaction and isinstance(answers[-1], QMPError):
        e = answers[-1]
        raise CheckpointError(f"backup begin on VM {vm.name}: QEMU refused: {e.desc}") from e


async def end(vm: QmpVM, session: str, *, drop_checkpoint: bool = False) -> None:
    """Remove ``session``'s point in time from QEMU and disk (hold ``vm.lock``). With QEMU
    unreachable the record and files stay: the next reconnect removes them."""
    held = vm.points.pop(session, None)
    if held is None:
        return
    held.ending = True
    if held.unsubscribe is not None:
        held.unsubscribe()
    if held.watcher is not None:
        held.watcher.cancel()
    try:
        gone = await fleece.teardown(vm.monitor, held.plan)
    except QEMUError as e:
        log.error("session %s: cleanup in QEMU failed: %s", session, e)
        raise
    if gone:
        vm.store.remove_session(session)
    else:
        log.warning(
            "session %s: QEMU is not connected; its nodes and files go when it reconnects",
            session,
        )
    if drop_checkpoint and held.checkpoint and vm.monitor.connected:
        await vm.delete_checkpoint_locked(held.checkpoint)


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


async def _watch_scratch(vm: QmpVM, held: HeldPoint, limit: int) -> None:
    """Break the point in time when its scratch data passes ``limit`` (--scratch-limit):
    its readers get EIO, and copy-before-write stops so the scratch stops growing; the
    guest's writes go on."""
    while True:
        await asyncio.sleep(SCRATCH_POLL)
        used = scratch_bytes(vm, held.plan.session)
        if used > limit:
            held.on_broken(f"scratch data {used} bytes passed --scratch-limit {limit}")
            await fleece.stop_copy_before_write(vm.monitor, held.plan)
            return


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
            gone = await fleece.teardown(vm.monitor, plan)
        except QEMUError as e:
            log.error("VM %s: stale session %s stays: %s", vm.name, record["id"], e)
            continue
        if gone:
            vm.store.remove_session(record["id"])


def _record(vm: QmpVM, held: HeldPoint) -> dict[str, Any]:
    return {
        "id": held.plan.session,
        "vm": vm.name,
        "checkpoint": held.checkpoint,
        "plan": held.plan.to_json(),
    }


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
