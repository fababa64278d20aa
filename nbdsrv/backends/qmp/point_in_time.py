"""Points in time of a QMP-driven VM: fleecing in QEMU, guarded by a session record.

begin (the VM's lock held)::

    session record (the plan)  ─►  scratch images + nodes  ─►  checkpoint intent
      ─►  ONE transaction: frozen bitmaps on the scratch nodes, the next checkpoint,
          copy-before-write for every disk                       (the point in time)
      ─►  checkpoint commit  ─►  QEMU exports, one per disk, on QEMU's NBD server

Everything is named in the record before it is created, so a failed begin, an end, or a
restart after a crash removes exactly that (qemu/fleece.py). A fleecing job event or a lost
QMP connection breaks the point in time: the session's ``on_broken`` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...backup.checkpoints import (
    Checkpoint,
    CheckpointError,
    assess,
    find_layer,
    wanted_checkpoints,
)
from ...proto.constants import DIRTY_BITMAP_PREFIX
from ...qemu import fleece
from ...qemu.errors import QEMUError
from ...qemu.images import create_scratch_image
from ...qemu.monitor import QMPEvent
from ..base import (
    BrokenCallback,
    CheckpointRef,
    PointInTime,
    PointInTimeRequest,
    UpstreamBitmap,
    UpstreamDisk,
)

if TYPE_CHECKING:
    from .vm import QmpVM

log = logging.getLogger(__name__)

SCRATCH_POLL = 0.5
JOB_EVENTS = ("BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


@dataclass
class HeldPoint:
    """A point in time this daemon holds in QEMU now."""

    plan: fleece.FleecePlan
    checkpoint: str | None
    on_broken: BrokenCallback
    unsubscribe: Any = None
    watcher: asyncio.Task[None] | None = None


async def begin(vm: QmpVM, request: PointInTimeRequest, on_broken: BrokenCallback) -> PointInTime:
    """Fix one point in time over every disk of ``vm`` (hold ``vm.lock``)."""
    state = await vm.chains()
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
    async with contextlib.aclosing(await vm.quiescer(request.quiesce)) as quiescer:
        os.makedirs(vm.scratch_dir, mode=0o700, exist_ok=True)
        plan = fleece.FleecePlan(
            session=request.session,
            nbd_socket=vm.nbd_socket or os.path.join(vm.store.directory, "fleece.sock"),
            start_nbd_server=vm.nbd_socket is None,
            disks=tuple(
                _plan_disk(request.session, disk, layers, wanted, vm.scratch_dir)
                for disk, layers in sorted(state.items())
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
                await create_scratch_image(disk.scratch_file, disk.size)
                await vm.monitor.execute("blockdev-add", fleece.scratch_node_options(disk))
            actions = [a for d in plan.disks for a in fleece.freeze_actions(d)]
            actions += checkpoint_actions
            actions += [fleece.backup_action(d) for d in plan.disks]
            op_id = vm.begin_create(new_checkpoint) if new_checkpoint else None
            held.unsubscribe = vm.monitor.subscribe(JOB_EVENTS, _job_event(held))
            await vm.transaction(f"backup begin on VM {vm.name}", actions, quiescer)
            if new_checkpoint is not None and op_id is not None:
                vm.commit_create(chain, new_checkpoint, op_id)
                committed = True
            for disk in plan.disks:
                await fleece.add_export(vm.monitor, disk)
            counts = {d.scratch_node: await fleece.bitmap_counts(vm.monitor, d.scratch_node)
                      for d in plan.disks}  # fmt: skip
        except BaseException as e:
            log.warning("VM %s: backup begin failed, cleaning up: %s", vm.name, e)
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


def _job_event(held: HeldPoint) -> Any:
    jobs = {d.job for d in held.plan.disks}

    def on_event(event: QMPEvent) -> None:
        if event.data.get("device") not in jobs:
            return
        detail = event.data.get("error") or event.data.get("action") or ""
        held.on_broken(f"fleecing job {event.data.get('device')}: {event.name} {detail}".strip())

    return on_event


async def end(vm: QmpVM, session: str, *, drop_checkpoint: bool = False) -> None:
    """Remove ``session``'s point in time from QEMU and disk (hold ``vm.lock``)."""
    held = vm.points.pop(session, None)
    if held is None:
        return
    if held.unsubscribe is not None:
        held.unsubscribe()
    if held.watcher is not None:
        held.watcher.cancel()
    monitor = vm.monitor
    try:
        await fleece.teardown(monitor if monitor.connected else None, held.plan)
    except QEMUError as e:
        log.error("session %s: cleanup in QEMU failed: %s", session, e)
        raise
    vm.store.remove_session(session)
    if drop_checkpoint and held.checkpoint:
        await vm.delete_checkpoint_locked(held.checkpoint)


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
        await fleece.teardown(vm.monitor if vm.monitor.connected else None, plan)
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
    disk: str,
    layers: Sequence[Any],
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
    return fleece.plan_disk(session_id, disk, top.node_name, top.virtual_size, scratch_dir, bitmaps)
