"""External snapshots of a QMP-driven VM: overlays and commits that keep every checkpoint
usable (the bitmap rules are in backup/snapshots.py; docs/snapshots.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from ...backup.checkpoints import ChainState, CheckpointChain, CheckpointError
from ...backup.crash_points import crash_point
from ...backup.snapshots import (
    after_commit,
    after_snapshot,
    commit_result_problems,
    intent_disks,
    overlay_file,
)
from ...backup.store import VMStore
from ...errors import NbdsrvError
from ...qemu.block_jobs import wait_job_gone, wait_job_ready
from ...qemu.chain import PROTOCOL_DRIVERS, nodes_of_file
from ...qemu.errors import QEMUError, QEMUGoneError, QMPError
from ...qemu.images import create_overlay
from ...qemu.monitor import Monitor
from ...qemu.names import disk_name
from .bitmap_actions import Action, commit_merge_actions, snapshot_actions

log = logging.getLogger(__name__)


class SnapshotError(NbdsrvError):
    """A snapshot operation refused or failed; QEMU's chain is as it was."""

    code = "snapshot"


class SnapshotHost(Protocol):
    """What snapshot create and commit use of the VM (a QmpVM): its QEMU, its store, and
    its committed chain."""

    name: str
    monitor: Monitor
    store: VMStore

    async def chains(self) -> ChainState: ...

    def load(self) -> tuple[CheckpointChain, dict[str, Any]]: ...

    def load_checked(self, state: ChainState) -> CheckpointChain: ...

    def overlays(self) -> list[str]: ...

    def save_chain(
        self, chain: CheckpointChain, op_id: str, overlays: list[str], *, tops: Mapping[str, str]
    ) -> None:
        """Write the chain with nbdsrv's overlays and the disks' new top images."""

    async def transaction(self, what: str, actions: list[Action]) -> None: ...


def commit_job(op_id: str, disk: str) -> str:
    """The id of the commit job of ``disk`` in operation ``op_id``."""
    return disk_name("nbdsrv-commit", op_id[:8], disk)


async def create(vm: SnapshotHost, directory: str | None = None) -> dict[str, str]:
    """New qcow2 overlays on every disk in one transaction; disk → overlay file."""
    state = await vm.chains()
    chain = vm.load_checked(state)
    if not state:
        raise SnapshotError(f"VM {vm.name} has no disks")
    if directory is not None and not os.path.isdir(directory):
        raise SnapshotError(f"{directory} is not a directory")
    op_id = uuid.uuid4().hex
    plan = {
        disk: {
            "file": overlay_file(layers[0].filename, directory),
            "node": disk_name("nbdsrv-snap", op_id[:8], disk),
        }
        for disk, layers in sorted(state.items())
    }
    for disk, item in plan.items():
        if os.path.exists(item["file"]):
            raise SnapshotError(f"disk {disk}: {item['file']} already exists")
    vm.store.write_intent({"id": op_id, "op": "snapshot-create", "overlays": plan})
    crash_point("snapshot-create:after-intent")
    try:
        for disk, item in plan.items():
            top = state[disk][0]
            # A device or file given to the guest with no format node holds raw data.
            backing_format = "raw" if top.format in PROTOCOL_DRIVERS else top.format
            await create_overlay(item["file"], top.filename, backing_format)
            await vm.monitor.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": item["node"],
                    "file": {"driver": "file", "filename": item["file"]},
                    "backing": None,
                },
            )
        nodes = {disk: item["node"] for disk, item in plan.items()}
        await vm.transaction(
            f"snapshot create on VM {vm.name}", snapshot_actions(chain, state, nodes)
        )
    except QEMUGoneError:
        raise  # the intent stays; reconciliation decides once QEMU is back
    except (QEMUError, CheckpointError) as e:
        await _drop_overlays(vm, plan)
        vm.store.clear_intent()
        raise SnapshotError(f"snapshot create on VM {vm.name}: {e}") from e
    crash_point("snapshot-create:after-transaction")
    files = {disk: item["file"] for disk, item in plan.items()}
    vm.save_chain(
        after_snapshot(chain, state, files),
        op_id,
        vm.overlays() + list(files.values()),
        tops=files,
    )
    crash_point("snapshot-create:after-commit")
    vm.store.clear_intent()
    log.info("VM %s: snapshot overlays %s", vm.name, files)
    return files


async def _drop_overlays(vm: SnapshotHost, plan: Mapping[str, Mapping[str, str]]) -> None:
    """Remove overlays that did not make it into a chain (nodes, then files)."""
    for item in plan.values():
        if vm.monitor.connected:
            with contextlib.suppress(QMPError):
                await vm.monitor.execute("blockdev-del", {"node-name": item["node"]})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(item["file"])


async def finish_create(
    vm: SnapshotHost, intent: Mapping[str, Any], chain: CheckpointChain, state: ChainState
) -> CheckpointChain:
    plan = intent["overlays"]
    done = all(
        disk in state and state[disk][0].filename == item["file"] for disk, item in plan.items()
    )
    if not done:
        log.info("VM %s: rolling back snapshot create", vm.name)
        await _drop_overlays(vm, plan)
        return chain
    log.info("VM %s: finishing snapshot create", vm.name)
    files = {disk: item["file"] for disk, item in plan.items()}
    # The chain now starts at the overlays: describe it as it was before them.
    before = {disk: tuple(layers[1:]) for disk, layers in state.items()}
    chain = after_snapshot(chain, before, files)
    vm.save_chain(chain, intent["id"], vm.overlays() + list(files.values()), tops=files)
    return chain


async def commit(vm: SnapshotHost) -> dict[str, str]:
    """Commit every disk's top overlay into the layer directly below it (never deeper: QEMU's
    default base is the bottom of the chain); disk → removed overlay."""
    state = await vm.chains()
    chain = vm.load_checked(state)
    disks: dict[str, tuple[str, str]] = {}
    for disk, layers in sorted(state.items()):
        if len(layers) < 2:
            raise SnapshotError(f"disk {disk} of VM {vm.name} has no snapshot to commit")
        disks[disk] = (layers[0].filename, layers[1].filename)
    op_id = uuid.uuid4().hex
    jobs = {disk: commit_job(op_id, disk) for disk in disks}
    vm.store.write_intent(
        {
            "id": op_id,
            "op": "snapshot-commit",
            "disks": {d: {"top": t, "base": b, "job": jobs[d]} for d, (t, b) in disks.items()},
        }
    )
    crash_point("snapshot-commit:after-intent")
    try:
        # A QSD disk's export sits on a passthrough node above the top layer: the job starts
        # at that root and commits the top below it (the export keeps its node).
        roots = {
            str(e["id"]): str(e["node-name"])
            for e in await vm.monitor.execute("query-block-exports")
        }
        for disk in disks:
            top, below = state[disk][0], state[disk][1]
            await vm.monitor.execute(
                "block-commit",
                {
                    "job-id": jobs[disk],
                    "device": roots.get(disk, top.node_name),
                    "top-node": top.node_name,
                    "base-node": below.node_name,
                },
            )
        for job in jobs.values():
            await wait_job_ready(vm.monitor, job)
        crash_point("snapshot-commit:after-ready")
        # The base is writable while the job runs: merge now, then let the job pivot.
        ready_state = await vm.chains()
        actions = commit_merge_actions(chain, ready_state, disks)
        if actions:
            await vm.monitor.transaction(actions)
        crash_point("snapshot-commit:after-merge")
        for job in jobs.values():
            await vm.monitor.execute("job-complete", {"id": job})
        for job in jobs.values():
            await wait_job_gone(vm.monitor, job)
    except QEMUGoneError:
        raise
    except QEMUError as e:
        for job in jobs.values():
            with contextlib.suppress(QMPError):
                await vm.monitor.execute("block-job-cancel", {"device": job, "force": True})
        for job in jobs.values():
            with contextlib.suppress(QEMUError):
                await wait_job_gone(vm.monitor, job)
        # The merge may have run: the layers below hold more bits than nbdsrv saw.
        vm.store.clear_counts()
        vm.store.clear_intent()
        raise SnapshotError(f"snapshot commit on VM {vm.name}: {e}") from e
    crash_point("snapshot-commit:after-complete")
    after = await vm.chains()
    removed = await _complete_commit(vm, chain, disks, op_id, after)
    wrong = commit_result_problems(state, after, disks)
    if wrong:
        raise SnapshotError(f"snapshot commit on VM {vm.name}: {wrong}")
    return removed


async def _complete_commit(
    vm: SnapshotHost,
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
    overlays = vm.overlays()
    removed: dict[str, str] = {}
    for disk, (top_file, _) in done.items():
        if vm.monitor.connected:
            for node in await nodes_of_file(vm.monitor, top_file):
                with contextlib.suppress(QMPError):
                    await vm.monitor.execute("blockdev-del", {"node-name": node})
        if top_file in overlays:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(top_file)
            overlays.remove(top_file)
        removed[disk] = top_file
    tops = {disk: base for disk, (_, base) in done.items()}
    in_memory = frozenset(disk for disk in done if not state[disk][0].persistent_bitmaps)
    vm.save_chain(after_commit(chain, done, in_memory), op_id, overlays, tops=tops)
    crash_point("snapshot-commit:after-commit")
    vm.store.clear_intent()
    log.info("VM %s: committed %s", vm.name, removed)
    return removed


async def finish_commit(
    vm: SnapshotHost, intent: Mapping[str, Any], chain: CheckpointChain, state: ChainState
) -> CheckpointChain:
    disks = intent_disks(intent)
    for disk in disks:
        # Intents of older versions named the job after the disk.
        job = intent["disks"][disk].get("job") or f"nbdsrv-commit-{disk}"
        # A job left running (ready or not) is cancelled: its disk stays as it was.
        with contextlib.suppress(QMPError):
            await vm.monitor.execute("block-job-cancel", {"device": job, "force": True})
        with contextlib.suppress(QMPError):
            await wait_job_gone(vm.monitor, job)
    state = await vm.chains()
    await _complete_commit(vm, chain, disks, intent["id"], state)
    return vm.load()[0]
