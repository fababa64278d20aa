"""A VM as nbdsrv sees it: a QMP monitor, its disks, and its checkpoint chain.

Every operation that changes QEMU follows one pattern, so a daemon killed at any instant
restarts into a state that agrees with QEMU::

    intent.json  ──►  QMP transaction  ──►  checkpoints.json (last_op = intent id)  ──►  rm intent
         crash here: QEMU unchanged       crash here: QEMU changed,       crash here: already
         → roll back (drop intent)        metadata not → finish it         committed → drop intent

At start-up and whenever QMP reconnects, :meth:`QmpVM.reconcile` looks at a left-over intent and
at what QEMU holds, and finishes or drops it. QMP errors mean QEMU refused the whole
transaction (nothing changed); a lost connection leaves the intent for the next reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ...backup.checkpoints import (
    DEFAULT_GRANULARITY,
    ChainState,
    Checkpoint,
    CheckpointChain,
    CheckpointError,
    assess,
    check_granularity,
    count_problem,
    find_layer,
    merged_parent,
    name_or_generated,
    observed_counts,
)
from ...backup.crash_points import crash_point
from ...backup.in_memory import held_in_memory, restart_problem
from ...backup.store import VMStore
from ...config.environment import seconds_from_environment
from ...errors import NbdsrvError
from ...qemu import process_marker, scratch_image
from ...qemu.chain import STATE_QUERIES, BlockState, block_state_of, query_block_state
from ...qemu.errors import QEMUError, QEMUGoneError, QEMUUnreachableError, QMPError, QMPTimeoutError
from ...qemu.guest_agent import agent_answers
from ...qemu.monitor import Monitor
from ...qemu.reopen import writable
from ..base import BrokenCallback, CreatedCheckpoint, PointInTime, PointInTimeRequest
from ..frozen_guest import FrozenGuest, GuestFrozenError
from ..views import BlockJobInfo, CheckpointInfo, QmpVMStatus
from . import external_snapshots
from .bitmap_actions import create_actions, delete_actions
from .point_in_time import PointsInTime
from .quiesce import QuiesceError, Quiescer, thaw_path

log = logging.getLogger(__name__)

# How often a VM's bitmaps are looked at between operations (seconds; NBDSRV_BITMAP_POLL).
BITMAP_POLL = 10.0


def bitmap_poll_interval() -> float:
    return seconds_from_environment("NBDSRV_BITMAP_POLL", BITMAP_POLL)


# How long `nbdsrv status` waits for QEMU before it reports a VM as unresponsive.
STATUS_TIMEOUT = 2.0


class QmpVM:
    """Checkpoints and points in time of one VM, kept in step with the QEMU behind
    ``monitor`` (a :class:`~nbdsrv.backends.base.VMBackend`)."""

    def __init__(
        self,
        name: str,
        monitor: Monitor,
        store: VMStore,
        scratch_dir: str,
        *,
        roots: Sequence[str] | None = None,
        nbd_socket: str | None = None,
        guest_agent: str | None = None,
    ) -> None:
        self.name = name
        self.monitor = monitor
        self.store = store
        self.scratch_dir = scratch_dir
        # The disks' root node names when known (a private QSD), else found from query-block.
        self.roots = list(roots) if roots is not None else None
        self.lock = asyncio.Lock()
        self.live_socket: str | None = None
        # An NBD server QEMU already runs (unix socket): sessions export there, since QEMU
        # runs at most one. None: nbdsrv starts its own for each session.
        self.nbd_socket = nbd_socket
        # The unix socket of the guest agent (--qga), for --quiesce.
        self.guest_agent = guest_agent
        # A guest frozen by --quiesce whose thaw is not confirmed yet (retried until it is).
        self.frozen_guest = FrozenGuest(name, store.directory, self._thaw_once)
        # --scratch-limit: a session whose scratch data grows past it breaks (0: no limit).
        self.scratch_limit = 0
        self.failure: str | None = None
        # The disks QEMU showed last: what status reports while QEMU does not answer.
        self.known_disks: list[str] = []
        self.points_in_time = PointsInTime(self)
        self._tasks: set[asyncio.Task[None]] = set()
        # The markers of the QEMU process behind the connection (qemu/process_marker.py):
        # None until looked at after each (re)connect. ``_connections`` counts losses, so
        # that an answer from before a loss is not taken for the process after it.
        self.qemu_markers: frozenset[str] | None = None
        self.marker_failure: str | None = None
        self._connections = 0
        self._identifying = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self.monitor.connected

    @property
    def guest_frozen(self) -> bool:
        return self.frozen_guest.frozen

    async def _thaw_once(self) -> bool:
        path = self.guest_agent or self.frozen_guest.info().get("agent")
        if not path:
            log.error("VM %s: the guest may be frozen but no guest agent is known", self.name)
            return False
        return await thaw_path(str(path), self.name)

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (else keep trying in the background) and reconcile; reconcile again
        whenever QMP comes back. A guest an earlier daemon left frozen is thawed (retried
        in the background, whether QEMU's monitor answers or not)."""
        if self.frozen_guest.frozen:
            log.warning("VM %s: an earlier daemon may have left the guest frozen", self.name)
            self.frozen_guest.keep_thawing()
        self._watch()
        try:
            await self.monitor.connect(timeout=5)
        except QEMUUnreachableError as e:
            self.failure = str(e)
            log.warning("VM %s: %s; retrying in the background", self.name, e)
            self.spawn(self._connect_later())
            return
        await self._reconcile()

    def _watch(self) -> None:
        self.spawn(self._poll())
        self.monitor.on_reconnect = lambda: self.spawn(self._reconcile())
        self.monitor.on_disconnect = lambda reason: self.lost(f"QMP connection lost: {reason}")

    async def stop(self) -> None:
        await self.frozen_guest.stop()
        await self._cancel_tasks()
        await self.monitor.close()

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def lost(self, reason: str) -> None:
        """QEMU went away: every point in time it held is broken."""
        self.failure = reason
        # The next process may be another one: look at its markers again.
        self.qemu_markers = None
        self._connections += 1
        self.points_in_time.broken(reason)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background until the VM stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_later(self) -> None:
        while True:
            try:
                await self.monitor.connect(timeout=3600)
            except QEMUUnreachableError:
                continue
            await self._reconcile()
            return

    async def _reconcile(self) -> None:
        try:
            await self.reconcile()
            await self.points_in_time.clean_stale()
            self.failure = None
        except QEMUError as e:
            self.failure = str(e)
            log.error("VM %s: reconciliation failed: %s", self.name, e)
            return
        self.spawn(self._prepare_scratch())

    async def _prepare_scratch(self) -> None:
        """Scratch image templates of the disks' sizes now, so that no backup begin waits
        for qemu-img (qemu/scratch_image.py)."""
        try:
            sizes = {layers[0].virtual_size for layers in (await self.chains()).values()}
            for size in sorted(sizes):
                await scratch_image.prepare(size)
        except (QEMUError, QEMUGoneError, OSError) as e:
            log.debug("VM %s: scratch templates not made now: %s", self.name, e)

    # -- points in time (point_in_time.py) --------------------------------------------------

    async def begin_point_in_time(
        self, request: PointInTimeRequest, on_broken: BrokenCallback
    ) -> PointInTime:
        return await self.points_in_time.begin(request, on_broken)

    async def give_up_point_in_time(self, session: str) -> None:
        await self.points_in_time.give_up(session)

    def confirm_point_in_time(self, session: str) -> None:
        self.points_in_time.confirm(session)

    async def end_point_in_time(self, session: str, *, drop_checkpoint: bool = False) -> None:
        await self.points_in_time.end(session, drop_checkpoint=drop_checkpoint)

    def scratch_bytes(self, session: str) -> int:
        return self.points_in_time.scratch_bytes(session)

    def why_broken(self, session: str, detail: str) -> str:
        return self.points_in_time.why_broken(session, detail)

    # -- QEMU state ---------------------------------------------------------------------------

    async def chains(self) -> ChainState:
        """Every disk's backing chain with its bitmaps, as QEMU holds it now."""
        return (await self.block_state()).chains(self.roots)

    async def block_state(self) -> BlockState:
        """QEMU's disks, nodes and exports now (one round trip). The first look after a
        (re)connect also finds which QEMU process this is; a process with a disk that cannot
        store bitmaps gets a marker if it has none (qemu/process_marker.py)."""
        if self.qemu_markers:
            return await query_block_state(self.monitor)
        async with self._identifying:
            connection = self._connections
            if self.qemu_markers is None:
                answers = await self.monitor.execute_many([process_marker.QUERY, *STATE_QUERIES])
                state = block_state_of(answers[1:])
                markers = process_marker.markers_of(answers[0])
            else:
                state = await query_block_state(self.monitor)
                markers = self.qemu_markers
            if not markers and self._holds_memory_bitmaps(state):
                try:
                    markers = frozenset({await process_marker.mark(self.monitor)})
                    self.marker_failure = None
                except QMPError as e:
                    # Checkpoints in memory are refused then; everything else goes on.
                    log.warning("VM %s: cannot mark the QEMU process: %s", self.name, e)
                    self.marker_failure = str(e)
            if connection == self._connections:
                self.qemu_markers = markers
            return state

    def _holds_memory_bitmaps(self, state: BlockState) -> bool:
        """A disk whose top layer cannot store bitmaps: its checkpoints live in memory."""
        try:
            return any(
                not layers[0].persistent_bitmaps for layers in state.chains(self.roots).values()
            )
        except QEMUError:
            return False

    async def disks(self) -> list[str]:
        return sorted((await self.chains()).keys())

    # -- metadata ---------------------------------------------------------------------------

    def load(self) -> tuple[CheckpointChain, dict[str, Any]]:
        document = self.store.load_checkpoints()
        return CheckpointChain.from_json(document.get("checkpoints", [])), document

    def save_chain(
        self,
        chain: CheckpointChain,
        op_id: str | None,
        overlays: list[str] | None = None,
        tops: Mapping[str, str] | None = None,
    ) -> None:
        """Write the chain. ``overlays``: the snapshot files nbdsrv made; ``tops``: disks whose
        top image changed (the embedded QSD opens these at the next start). Both kept if None."""
        document = self.store.load_checkpoints()
        chain = self._held_here(chain)
        if overlays is None:
            overlays = list(document.get("overlays", []))
        all_tops = {**document.get("tops", {}), **(tops or {})}
        self.store.save_checkpoints(
            {
                "last_op": op_id,
                "checkpoints": chain.to_json(),
                "overlays": overlays,
                "tops": all_tops,
            }
        )

    def _held_here(self, chain: CheckpointChain) -> CheckpointChain:
        """Checkpoints that gained bitmaps in memory (a commit into a raw base) are held by
        the QEMU process nbdsrv looks at now."""
        for checkpoint in chain:
            if checkpoint.process is None and not checkpoint.persistent and self.qemu_markers:
                chain = chain.replaced(replace(checkpoint, process=min(self.qemu_markers)))
        return chain

    def has_checkpoint(self, name: str) -> bool:
        """The committed chain lists ``name``."""
        return self.load()[0].has(name)

    def overlays(self) -> list[str]:
        return list(self.store.load_checkpoints().get("overlays", []))

    def _record_problems(self, chain: CheckpointChain, state: ChainState) -> CheckpointChain:
        """Make every problem QEMU shows sticky (lost bits do not come back), counts that
        went where no write takes them included; then remember the counts seen now."""
        _, document = self.load()
        last_op = document.get("last_op")
        seen = self.store.load_counts(last_op)
        reasons = assess(chain, state)
        changed = chain
        for checkpoint in chain:
            if checkpoint.invalid is not None:
                continue
            # A restart first: its bitmaps are gone, or are not the ones that saw every write.
            reason = restart_problem(checkpoint, self.qemu_markers) or reasons[checkpoint.name]
            if reason is None or reason.startswith("later checkpoint"):
                reason = count_problem(checkpoint, state, seen)
            if reason:
                log.warning(
                    "VM %s: checkpoint %s is invalid: %s", self.name, checkpoint.name, reason
                )
                changed = changed.replaced(replace(checkpoint, invalid=reason))
        if changed is not chain:
            self.save_chain(changed, last_op)
        now = observed_counts(changed, state)
        if now != seen:
            self.store.save_counts(last_op, now)
        return changed

    async def remember_counts(self, snapshot: BlockState | None = None) -> None:
        """Look at QEMU right after an operation of ours (or take ``snapshot``, looked at
        then): the counts it left are the new baseline (a clear just after it must not go
        unseen until the next poll)."""
        try:
            if snapshot is None:
                snapshot = await self.block_state()
            self._record_problems(self.load()[0], snapshot.chains(self.roots))
        except (QEMUError, QEMUGoneError) as e:
            log.debug("VM %s: counts not taken after the operation: %s", self.name, e)

    async def _poll(self) -> None:
        """Every BITMAP_POLL seconds look at QEMU's bitmaps when no operation runs."""
        while True:
            await asyncio.sleep(bitmap_poll_interval())
            if not self.monitor.connected or self.lock.locked():
                continue
            try:
                async with self.lock:
                    # Bounded: a stopped QEMU must not hold the lock for QMP's long timeout.
                    async with asyncio.timeout(STATUS_TIMEOUT):
                        state = await self.chains()
                    self._record_problems(self.load()[0], state)
            except (QEMUError, QEMUGoneError, TimeoutError) as e:
                log.debug("VM %s: bitmap poll: %s", self.name, e or "no answer")

    # -- reconciliation ------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Finish or roll back a half-done operation; mark what QEMU lost invalid."""
        async with self.lock:
            await self.reconcile_locked()

    async def reconcile_locked(self) -> None:
        """:meth:`reconcile` for a caller that holds the lock."""
        state = await self.chains()
        intent = self.store.read_intent()
        chain, document = self.load()
        if intent is not None:
            if document.get("last_op") == intent["id"]:
                log.info("VM %s: operation %s was committed", self.name, intent["id"])
            elif intent["op"] == "create" and intent.get("session"):
                # A backup begin that did not complete leaves no checkpoint behind.
                chain = await self.roll_back_create(intent, chain, state)
                state = await self.chains()  # as the rollback left it
            else:
                chain = await self._finish_intent(intent, chain, state)
            self.store.clear_intent()
        self._record_problems(chain, state)

    async def roll_back_create(
        self, intent: Mapping[str, Any], chain: CheckpointChain, state: ChainState
    ) -> CheckpointChain:
        """Undo the checkpoint a backup begin had started to create (hold the lock): merge
        its bits into its parent, which records again, and remove it, so "since the parent"
        stays exact. The parent may have gone on recording meanwhile: a superset, still
        right. Nothing to do when its bitmap was never added. The committed chain, which
        never listed it; the intent is left for the caller to clear."""
        checkpoint = Checkpoint.from_json(intent["checkpoint"])
        if not any(_segments_present(checkpoint, state)):
            return chain
        log.info("VM %s: rolling back checkpoint %s of an unfinished backup begin",
                 self.name, checkpoint.name)  # fmt: skip
        staged = chain if chain.has(checkpoint.name) else chain.added(checkpoint)
        actions = delete_actions(staged, state, checkpoint.name)
        if actions:
            nodes = {str(data["node"]) for _, data in actions}
            async with writable(self.monitor, list(state.values()), nodes):  # type: ignore[arg-type]
                await self.monitor.transaction(actions)
        crash_point("checkpoint-rollback:after-transaction")
        chain = merged_parent(staged, checkpoint.name)
        self.save_chain(chain, intent["id"])
        return chain

    async def roll_back_begin(self) -> None:
        """Undo the new checkpoint of a failed backup begin (its intent is on disk; hold the
        lock). When QEMU cannot be reached the intent stays: the next reconcile rolls it
        back."""
        intent = self.store.read_intent()
        if intent is None:
            return  # QEMU refused the transaction that adds it: nothing was done
        try:
            state = await self.chains()
            await self.roll_back_create(intent, self.load()[0], state)
        except (QEMUError, QEMUGoneError) as e:
            log.error("VM %s: the new checkpoint is rolled back later: %s", self.name, e)
            return
        self.store.clear_intent()

    async def _finish_intent(
        self, intent: Mapping[str, Any], chain: CheckpointChain, state: ChainState
    ) -> CheckpointChain:
        op = intent["op"]
        if op == "create":
            checkpoint = Checkpoint.from_json(intent["checkpoint"])
            present = _segments_present(checkpoint, state)
            if present and all(present):
                log.info("VM %s: finishing checkpoint create %s", self.name, checkpoint.name)
                chain = chain.added(checkpoint)
                self.save_chain(chain, intent["id"])
            else:
                # A transaction is all or nothing: no bitmap means nothing happened.
                log.info("VM %s: rolling back checkpoint create %s", self.name, checkpoint.name)
            return chain
        if op == "delete":
            name = intent["name"]
            if not chain.has(name):
                return chain
            present = _segments_present(chain.find(name), state)
            if not any(present):
                log.info("VM %s: finishing checkpoint delete %s", self.name, name)
                chain = merged_parent(chain, name)
                self.save_chain(chain, intent["id"])
            else:
                log.info("VM %s: rolling back checkpoint delete %s", self.name, name)
            return chain
        if op == "snapshot-create":
            return await external_snapshots.finish_create(self, intent, chain, state)
        if op == "snapshot-commit":
            return await external_snapshots.finish_commit(self, intent, chain, state)
        log.warning("VM %s: dropping unknown intent %r", self.name, op)
        return chain

    # -- operations -----------------------------------------------------------------------

    async def transaction(
        self,
        what: str,
        actions: list[tuple[str, dict[str, Any]]],
        quiescer: Quiescer | None = None,
    ) -> None:
        """Run a transaction whose intent is written (see the module docstring), with the
        guest frozen around it when ``quiescer`` quiesces."""
        try:
            if quiescer is None:
                await self.monitor.transaction(actions)
            else:
                async with quiescer.frozen():
                    await self.monitor.transaction(actions)
        except QuiesceError:
            self.store.clear_intent()  # the freeze failed: the transaction never ran
            raise
        except QMPTimeoutError:
            raise  # the intent stays: QEMU may still have done it; reconcile decides
        except QMPError as e:
            # QEMU refused the transaction as a whole: nothing changed.
            self.store.clear_intent()
            raise CheckpointError(f"{what}: QEMU refused: {e.desc}") from e
        except QEMUGoneError:
            raise

    def load_checked(self, state: ChainState) -> CheckpointChain:
        """The committed chain with every problem QEMU shows now written down."""
        chain, _ = self.load()
        return self._record_problems(chain, state)

    def plan_checkpoint(
        self, chain: CheckpointChain, state: ChainState, name: str | None, granularity: int | None
    ) -> tuple[Checkpoint, list[tuple[str, dict[str, Any]]]]:
        """Check the request; the new checkpoint and its transaction actions. Hold the lock."""
        granularity = check_granularity(granularity or DEFAULT_GRANULARITY)
        name = name_or_generated(name)
        if chain.has(name):
            raise CheckpointError(f"VM {self.name} already has a checkpoint '{name}'")
        if not state:
            raise CheckpointError(f"VM {self.name} has no disks")
        checkpoint, actions = create_actions(chain, state, name, granularity)
        if not checkpoint.persistent:
            # Bitmaps in QEMU's memory: valid as long as this process runs (backup/in_memory.py).
            if not self.qemu_markers:
                raise CheckpointError(
                    f"VM {self.name}: disks {', '.join(sorted(held_in_memory(checkpoint)))} "
                    "need bitmaps in QEMU's memory, and nbdsrv could not mark the QEMU process "
                    f"that holds them ({self.marker_failure or 'not looked at yet'})"
                )
            checkpoint = replace(checkpoint, process=min(self.qemu_markers))
        return checkpoint, actions

    def begin_create(self, checkpoint: Checkpoint, session: str | None = None) -> str:
        """Write the intent of creating ``checkpoint``; its id. Hold the lock. With
        ``session`` (a backup begin), a restart that finds the intent rolls it back."""
        op_id = uuid.uuid4().hex
        intent = {"id": op_id, "op": "create", "checkpoint": checkpoint.to_json()}
        if session is not None:
            intent["session"] = session
        self.store.write_intent(intent)
        crash_point("checkpoint-create:after-intent")
        return op_id

    def commit_create(self, chain: CheckpointChain, checkpoint: Checkpoint, op_id: str) -> None:
        self.save_chain(chain.added(checkpoint), op_id)
        crash_point("checkpoint-create:after-commit")
        self.store.clear_intent()
        log.info("VM %s: checkpoint %s created", self.name, checkpoint.name)

    async def create_checkpoint(
        self, name: str | None = None, granularity: int | None = None, *, quiesce: bool = False
    ) -> CreatedCheckpoint:
        async with self.lock:
            state = await self.chains()
            chain = self.load_checked(state)
            checkpoint, actions = self.plan_checkpoint(chain, state, name, granularity)
            async with contextlib.aclosing(await self.quiescer(quiesce)) as quiescer:
                op_id = self.begin_create(checkpoint)
                try:
                    await self.transaction(
                        f"checkpoint create {checkpoint.name}", actions, quiescer
                    )
                except GuestFrozenError:
                    await self.undo_create(checkpoint.name)
                    raise
            crash_point("checkpoint-create:after-transaction")
            self.commit_create(chain, checkpoint, op_id)
            await self.remember_counts()
            return CreatedCheckpoint(
                checkpoint.name, checkpoint.parent, checkpoint.created, quiescer.quiesced
            )

    async def undo_create(self, name: str) -> None:
        """A checkpoint create whose command fails after its transaction may have run (the
        thaw was not confirmed): settle the intent as a restart would, then delete the
        checkpoint if it was made, so the failed command leaves none. Hold the lock."""
        try:
            await self.reconcile_locked()
            if self.load()[0].has(name):
                await self.delete_checkpoint_locked(name)
        except (NbdsrvError, QEMUError, QEMUGoneError) as e:
            # The intent stays: the next reconcile settles it.
            log.error("VM %s: cannot undo checkpoint %s now: %s", self.name, name, e)

    async def quiescer(self, wanted: bool) -> Quiescer:
        """The guest agent, connected and answering, when ``wanted``; fails before anything
        is done otherwise."""
        return await Quiescer.open(self.name, self.guest_agent, self.frozen_guest, wanted)

    async def delete_checkpoint(self, name: str) -> None:
        async with self.lock:
            await self.delete_checkpoint_locked(name)

    async def delete_checkpoint_locked(self, name: str) -> None:
        state = await self.chains()
        # Problems first: a merge must not carry bits someone else removed into the parent.
        chain = self.load_checked(state)
        chain.find(name)
        actions = delete_actions(chain, state, name)
        op_id = uuid.uuid4().hex
        self.store.write_intent({"id": op_id, "op": "delete", "name": name})
        crash_point("checkpoint-delete:after-intent")
        if actions:
            nodes = {str(data["node"]) for _, data in actions}
            async with writable(self.monitor, list(state.values()), nodes):  # type: ignore[arg-type]
                await self.transaction(f"checkpoint delete {name}", actions)
        crash_point("checkpoint-delete:after-transaction")
        self.save_chain(merged_parent(chain, name), op_id)
        crash_point("checkpoint-delete:after-commit")
        self.store.clear_intent()
        log.info("VM %s: checkpoint %s deleted", self.name, name)
        await self.remember_counts()

    # -- external snapshots (external_snapshots.py) ----------------------------------------

    async def snapshot_create(self, directory: str | None = None) -> dict[str, str]:
        """New qcow2 overlays on every disk in one transaction; disk → overlay file."""
        async with self.lock:
            try:
                return await external_snapshots.create(self, directory)
            finally:
                await self.remember_counts()

    async def snapshot_commit(self) -> dict[str, str]:
        """Commit every disk's top overlay into the layer below; disk → removed overlay."""
        async with self.lock:
            try:
                return await external_snapshots.commit(self)
            finally:
                await self.remember_counts()

    def known_checkpoints(self) -> list[tuple[str, bool]]:
        """From checkpoints.json: what the last look at QEMU found (see _poll)."""
        return [(c.name, c.invalid is None) for c in self.load()[0]]

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        """Each checkpoint re-checked against QEMU now. A QEMU that does not answer within
        STATUS_TIMEOUT (stopped, hung) fails the listing at once, saying so: validity that
        cannot be checked is not reported."""
        async with self.lock:
            chain, _ = self.load()
            if self.monitor.connected:
                try:
                    async with asyncio.timeout(STATUS_TIMEOUT):
                        state = await self.chains()
                except TimeoutError:
                    raise QEMUError(
                        f"VM {self.name}: QEMU did not answer within {STATUS_TIMEOUT:g} s "
                        "(stopped or hung?), so its checkpoints cannot be checked now"
                    ) from None
                chain = self._record_problems(chain, state)
                reasons = assess(chain, state)
            else:
                reasons = {c.name: c.invalid for c in chain}
            return [
                CheckpointInfo(
                    name=c.name,
                    parent=c.parent,
                    created=c.created,
                    granularity=c.granularity,
                    disks=sorted(c.disks),
                    valid=reasons[c.name] is None,
                    reason=reasons[c.name],
                    persistent=c.persistent,
                )
                for c in chain
            ]

    async def describe(self) -> QmpVMStatus:
        """What ``nbdsrv status`` shows. Never waits long on QEMU: when QEMU does not answer
        within STATUS_TIMEOUT (stopped, hung), the last known disks are shown and the VM is
        marked unresponsive."""
        info = QmpVMStatus(
            name=self.name,
            qmp=self.monitor.path,
            qmp_connected=self.monitor.connected,
            responsive=self.monitor.connected,
            live_socket=self.live_socket,
            guest_agent=self.guest_agent,
            guest_agent_connected=(
                await agent_answers(self.guest_agent) if self.guest_agent else False
            ),
            guest_frozen=self.guest_frozen,
            error=self.failure,
            disks=[],
            jobs=[],
            checkpoints=[],
        )
        if self.monitor.connected:
            try:
                async with asyncio.timeout(STATUS_TIMEOUT):
                    self.known_disks = await self.disks()
                    info["jobs"] = [
                        BlockJobInfo(
                            device=job.get("device"),
                            type=job.get("type"),
                            offset=job.get("offset"),
                            len=job.get("len"),
                            ready=job.get("ready"),
                        )
                        for job in await self.monitor.execute("query-block-jobs")
                    ]
                info["disks"] = self.known_disks
            except TimeoutError:
                info["responsive"] = False
                info["disks"] = self.known_disks
                info["error"] = f"QEMU did not answer within {STATUS_TIMEOUT:g} s (unresponsive)"
            except (QMPError, QEMUGoneError) as e:
                info["error"] = str(e)
        chain, _ = self.load()
        info["checkpoints"] = [c.name for c in chain]
        return info


def _segments_present(checkpoint: Checkpoint, state: ChainState) -> list[bool]:
    """For each segment of the checkpoint's bitmap: does QEMU hold it?"""
    out = []
    for disk, segments in checkpoint.disks.items():
        for segment in segments:
            layer = find_layer(state.get(disk, ()), segment.file)
            out.append(layer is not None and layer.bitmap(segment.bitmap) is not None)
    return out
