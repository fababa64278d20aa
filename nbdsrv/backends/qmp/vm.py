"""A VM as nbdsrv sees it: a QMP monitor, its disks, and its checkpoint chain.

Every operation that changes QEMU follows one pattern, so a daemon killed at any instant
restarts into a state that agrees with QEMU::

    intent.json  ──►  QMP transaction  ──►  checkpoints.json (last_op = intent id)  ──►  rm intent
         crash here: QEMU unchanged       crash here: QEMU changed,       crash here: already
         → roll back (drop intent)        metadata not → finish it         committed → drop intent

At start-up and whenever QMP reconnects, :meth:`VM.reconcile` looks at a left-over intent and
at what QEMU holds, and finishes or drops it. QMP errors mean QEMU refused the whole
transaction (nothing changed); a lost connection leaves the intent for the next reconcile.
"""

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
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
    check_name,
    create_actions,
    delete_actions,
    find_layer,
    generated_name,
    merged_parent,
)
from ...backup.crash_points import crash_point
from ...backup.snapshots import (
    after_commit,
    after_snapshot,
    commit_merge_actions,
    intent_disks,
    overlay_file,
    snapshot_actions,
)
from ...backup.store import VMStore
from ...errors import NbdsrvError
from ...qemu.block_jobs import (
    create_overlay,
    wait_job_gone,
    wait_job_ready,
)
from ...qemu.block_jobs import (
    nodes_of_file as _nodes_of_file,
)
from ...qemu.chain import discover_chains
from ...qemu.errors import QEMUError, QEMUGoneError, QMPError, QMPTimeoutError
from ...qemu.monitor import Monitor
from ...qemu.reopen import writable

log = logging.getLogger(__name__)


class SnapshotError(NbdsrvError):
    """A snapshot operation refused or failed; QEMU's chain is as it was."""


class VM:
    """Checkpoints of one VM, kept in step with the QEMU behind ``monitor``."""

    def __init__(
        self,
        name: str,
        monitor: Monitor,
        store: VMStore,
        *,
        roots: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.monitor = monitor
        self.store = store
        # The disks' root node names when known (a private QSD), else found from query-block.
        self.roots = list(roots) if roots is not None else None
        self.lock = asyncio.Lock()
        self.live_socket: str | None = None
        # An NBD server QEMU already runs (unix socket): sessions export there, since QEMU
        # runs at most one. None: nbdsrv starts its own for each session.
        self.nbd_socket: str | None = None
        self.failure: str | None = None

    # -- QEMU state ---------------------------------------------------------------------------

    async def chains(self) -> ChainState:
        """Every disk's backing chain with its bitmaps, as QEMU holds it now."""
        return await discover_chains(self.monitor, self.roots)

    async def disks(self) -> list[str]:
        return sorted((await self.chains()).keys())

    # -- metadata ---------------------------------------------------------------------------

    def _load(self) -> tuple[CheckpointChain, dict[str, Any]]:
        document = self.store.load_checkpoints()
        return CheckpointChain.from_json(document.get("checkpoints", [])), document

    def _commit(
        self,
        chain: CheckpointChain,
        op_id: str | None,
        overlays: list[str] | None = None,
        tops: Mapping[str, str] | None = None,
    ) -> None:
        """Write the chain. ``overlays``: the snapshot files nbdsrv made; ``tops``: disks whose
        top image changed (the embedded QSD opens these at the next start). Both kept if None."""
        document = self.store.load_checkpoints()
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

    def _overlays(self) -> list[str]:
        return list(self.store.load_checkpoints().get("overlays", []))

    def _record_problems(self, chain: CheckpointChain, state: ChainState) -> CheckpointChain:
        """Make every problem QEMU shows sticky: lost bits do not come back."""
        reasons = assess(chain, state)
        changed = chain
        for checkpoint in chain:
            reason = reasons[checkpoint.name]
            if reason and checkpoint.invalid is None and not reason.startswith("later checkpoint"):
                log.warning(
                    "VM %s: checkpoint %s is invalid: %s", self.name, checkpoint.name, reason
                )
                changed = changed.replaced(replace(checkpoint, invalid=reason))
        if changed is not chain:
            _, document = self._load()
            self._commit(changed, document.get("last_op"))
        return changed

    # -- reconciliation ------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Finish or roll back a half-done operation; mark what QEMU lost invalid."""
        async with self.lock:
            state = await self.chains()
            intent = self.store.read_intent()
            chain, document = self._load()
            if intent is not None:
                if document.get("last_op") == intent["id"]:
                    log.info("VM %s: operation %s was committed", self.name, intent["id"])
                else:
                    chain = await self._finish_intent(intent, chain, state)
                self.store.clear_intent()
            self._record_problems(chain, state)

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
                self._commit(chain, intent["id"])
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
                self._commit(chain, intent["id"])
            else:
                log.info("VM %s: rolling back checkpoint delete %s", self.name, name)
            return chain
        if op == "snapshot-create":
            return await self._finish_snapshot_create(intent, chain, state)
        if op == "snapshot-commit":
            return await self._finish_snapshot_commit(intent, chain, state)
        log.warning("VM %s: dropping unknown intent %r", self.name, op)
        return chain

    # -- operations -----------------------------------------------------------------------

    async def transaction(self, what: str, actions: list[tuple[str, dict[str, Any]]]) -> None:
        """Run a transaction whose intent is written (see the module docstring)."""
        try:
            await self.monitor.transaction(actions)
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
        chain, _ = self._load()
        return self._record_problems(chain, state)

    def plan_checkpoint(
        self, chain: CheckpointChain, state: ChainState, name: str | None, granularity: int | None
    ) -> tuple[Checkpoint, list[tuple[str, dict[str, Any]]]]:
        """Check the request; the new checkpoint and its transaction actions. Hold the lock."""
        granularity = check_granularity(granularity or DEFAULT_GRANULARITY)
        name = check_name(name or generated_name())
        if chain.has(name):
            raise CheckpointError(f"VM {self.name} already has a checkpoint '{name}'")
        if not state:
            raise CheckpointError(f"VM {self.name} has no disks")
        return create_actions(chain, state, name, granularity)

    def begin_create(self, checkpoint: Checkpoint) -> str:
        """Write the intent of creating ``checkpoint``; its id. Hold the lock."""
        op_id = uuid.uuid4().hex
        self.store.write_intent({"id": op_id, "op": "create", "checkpoint": checkpoint.to_json()})
        crash_point("checkpoint-create:after-intent")
        return op_id

    def commit_create(self, chain: CheckpointChain, checkpoint: Checkpoint, op_id: str) -> None:
        crash_point("checkpoint-create:after-transaction")
        self._commit(chain.added(checkpoint), op_id)
        crash_point("checkpoint-create:after-commit")
        self.store.clear_intent()
        log.info("VM %s: checkpoint %s created", self.name, checkpoint.name)

    async def create_checkpoint(
        self, name: str | None = None, granularity: int | None = None
    ) -> Checkpoint:
        async with self.lock:
            state = await self.chains()
            chain = self.load_checked(state)
            checkpoint, actions = self.plan_checkpoint(chain, state, name, granularity)
            op_id = self.begin_create(checkpoint)
            await self.transaction(f"checkpoint create {checkpoint.name}", actions)
            self.commit_create(chain, checkpoint, op_id)
            return checkpoint

    async def delete_checkpoint(self, name: str) -> None:
        async with self.lock:
            await self.delete_checkpoint_locked(name)

    async def delete_checkpoint_locked(self, name: str) -> None:
        state = await self.chains()
        chain, _ = self._load()
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
        self._commit(merged_parent(chain, name), op_id)
        crash_point("checkpoint-delete:after-commit")
        self.store.clear_intent()
        log.info("VM %s: checkpoint %s deleted", self.name, name)

    # -- external snapshots ---------------------------------------------------------------

    async def snapshot_create(self, directory: str | None = None) -> dict[str, str]:
        """New qcow2 overlays on every disk in one transaction; disk → overlay file."""
        async with self.lock:
            state = await self.chains()
            chain = self.load_checked(state)
            if not state:
                raise SnapshotError(f"VM {self.name} has no disks")
            if directory is not None and not os.path.isdir(directory):
                raise SnapshotError(f"{directory} is not a directory")
            op_id = uuid.uuid4().hex
            plan = {
                disk: {
                    "file": overlay_file(layers[0].filename, directory),
                    "node": f"nbdsrv-snap-{op_id[:8]}-{disk}",
                }
                for disk, layers in sorted(state.items())
            }
            for disk, item in plan.items():
                if os.path.exists(item["file"]):
                    raise SnapshotError(f"disk {disk}: {item['file']} already exists")
            self.store.write_intent({"id": op_id, "op": "snapshot-create", "overlays": plan})
            crash_point("snapshot-create:after-intent")
            try:
                for disk, item in plan.items():
                    top = state[disk][0]
                    await create_overlay(item["file"], top.filename, top.format)
                    await self.monitor.execute(
                        "blockdev-add",
                        {
                            "driver": "qcow2",
                            "node-name": item["node"],
                            "file": {"driver": "file", "filename": item["file"]},
                            "backing": None,
                        },
                    )
                nodes = {disk: item["node"] for disk, item in plan.items()}
                await self.transaction(
                    f"snapshot create on VM {self.name}", snapshot_actions(chain, state, nodes)
                )
            except QEMUGoneError:
                raise  # the intent stays; reconciliation decides once QEMU is back
            except (QEMUError, CheckpointError) as e:
                await self._drop_overlays(plan)
                self.store.clear_intent()
                raise SnapshotError(f"snapshot create on VM {self.name}: {e}") from e
            crash_point("snapshot-create:after-transaction")
            files = {disk: item["file"] for disk, item in plan.items()}
            self._commit(
                after_snapshot(chain, state, files),
                op_id,
                self._overlays() + list(files.values()),
                tops=files,
            )
            crash_point("snapshot-create:after-commit")
            self.store.clear_intent()
            log.info("VM %s: snapshot overlays %s", self.name, files)
            return files

    async def _drop_overlays(self, plan: Mapping[str, Mapping[str, str]]) -> None:
        """Remove overlays that did not make it into a chain (nodes, then files)."""
        for item in plan.values():
            if self.monitor.connected:
                with contextlib.suppress(QMPError):
                    await self.monitor.execute("blockdev-del", {"node-name": item["node"]})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item["file"])

    async def _finish_snapshot_create(
        self, intent: Mapping[str, Any], chain: CheckpointChain, state: ChainState
    ) -> CheckpointChain:
        plan = intent["overlays"]
        done = all(
            disk in state and state[disk][0].filename == item["file"] for disk, item in plan.items()
        )
        if not done:
            log.info("VM %s: rolling back snapshot create", self.name)
            await self._drop_overlays(plan)
            return chain
        log.info("VM %s: finishing snapshot create", self.name)
        files = {disk: item["file"] for disk, item in plan.items()}
        # The chain now starts at the overlays: describe it as it was before them.
        before = {disk: tuple(layers[1:]) for disk, layers in state.items()}
        chain = after_snapshot(chain, before, files)
        self._commit(chain, intent["id"], self._overlays() + list(files.values()), tops=files)
        return chain

    async def snapshot_commit(self) -> dict[str, str]:
        """Commit every disk's top overlay into the layer below; disk → removed overlay."""
        async with self.lock:
            state = await self.chains()
            chain = self.load_checked(state)
            disks: dict[str, tuple[str, str]] = {}
            for disk, layers in sorted(state.items()):
                if len(layers) < 2:
                    raise SnapshotError(f"disk {disk} of VM {self.name} has no snapshot to commit")
                disks[disk] = (layers[0].filename, layers[1].filename)
            op_id = uuid.uuid4().hex
            self.store.write_intent(
                {
                    "id": op_id,
                    "op": "snapshot-commit",
                    "disks": {d: {"top": t, "base": b} for d, (t, b) in disks.items()},
                }
            )
            crash_point("snapshot-commit:after-intent")
            jobs = {disk: f"nbdsrv-commit-{disk}" for disk in disks}
            try:
                # A QSD disk's export sits on a passthrough node above the top layer: the job
                # starts at that root and commits the top below it (the export keeps its node).
                roots = {
                    str(e["id"]): str(e["node-name"])
                    for e in await self.monitor.execute("query-block-exports")
                }
                for disk in disks:
                    top = state[disk][0].node_name
                    await self.monitor.execute(
                        "block-commit",
                        {"job-id": jobs[disk], "device": roots.get(disk, top), "top-node": top},
                    )
                for job in jobs.values():
                    await wait_job_ready(self.monitor, job)
                crash_point("snapshot-commit:after-ready")
                # The base is writable while the job runs: merge now, then let the job pivot.
                ready_state = await self.chains()
                actions = commit_merge_actions(chain, ready_state, disks)
                if actions:
                    await self.monitor.transaction(actions)
                crash_point("snapshot-commit:after-merge")
                for job in jobs.values():
                    await self.monitor.execute("job-complete", {"id": job})
                for job in jobs.values():
                    await wait_job_gone(self.monitor, job)
            except QEMUGoneError:
                raise
            except QEMUError as e:
                for job in jobs.values():
                    with contextlib.suppress(QMPError):
                        await self.monitor.execute("block-job-cancel", {"device": job})
                self.store.clear_intent()
                raise SnapshotError(f"snapshot commit on VM {self.name}: {e}") from e
            crash_point("snapshot-commit:after-complete")
            return await self._complete_commit(chain, disks, op_id, await self.chains())

    async def _complete_commit(
        self,
        chain: CheckpointChain,
        disks: Mapping[str, tuple[str, str]],
        op_id: str,
        state: ChainState,
    ) -> dict[str, str]:
        """Metadata for the disks whose top is now their old base; drop the old tops."""
        done = {
            disk: files
            for disk, files in disks.items()
            if disk in state and state[disk][0].filename == files[1]
        }
        overlays = self._overlays()
        removed: dict[str, str] = {}
        for disk, (top_file, _) in done.items():
            if self.monitor.connected:
                for node in await _nodes_of_file(self.monitor, top_file):
                    with contextlib.suppress(QMPError):
                        await self.monitor.execute("blockdev-del", {"node-name": node})
            if top_file in overlays:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(top_file)
                overlays.remove(top_file)
            removed[disk] = top_file
        tops = {disk: base for disk, (_, base) in done.items()}
        self._commit(after_commit(chain, done), op_id, overlays, tops=tops)
        crash_point("snapshot-commit:after-commit")
        self.store.clear_intent()
        log.info("VM %s: committed %s", self.name, removed)
        return removed

    async def _finish_snapshot_commit(
        self, intent: Mapping[str, Any], chain: CheckpointChain, state: ChainState
    ) -> CheckpointChain:
        disks = intent_disks(intent)
        for disk in disks:
            job = f"nbdsrv-commit-{disk}"
            # A job left running (ready or not) is cancelled: its disk stays as it was.
            with contextlib.suppress(QMPError):
                await self.monitor.execute("block-job-cancel", {"device": job, "force": True})
            with contextlib.suppress(QMPError):
                await wait_job_gone(self.monitor, job)
        state = await self.chains()
        await self._complete_commit(chain, disks, intent["id"], state)
        return self._load()[0]

    async def list_checkpoints(self) -> list[dict[str, Any]]:
        async with self.lock:
            chain, _ = self._load()
            if self.monitor.connected:
                state = await self.chains()
                chain = self._record_problems(chain, state)
                reasons = assess(chain, state)
            else:
                reasons = {c.name: c.invalid for c in chain}
            return [
                {
                    "name": c.name,
                    "parent": c.parent,
                    "created": c.created,
                    "granularity": c.granularity,
                    "disks": sorted(c.disks),
                    "valid": reasons[c.name] is None,
                    "reason": reasons[c.name],
                }
                for c in chain
            ]

    async def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "qmp": self.monitor.path,
            "qmp_connected": self.monitor.connected,
            "live_socket": self.live_socket,
            "error": self.failure,
        }
        try:
            info["disks"] = await self.disks() if self.monitor.connected else []
        except (QMPError, QEMUGoneError) as e:
            info["disks"] = []
            info["error"] = str(e)
        chain, _ = self._load()
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
