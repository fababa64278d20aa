"""A point in time over QEMU's disks: scratch nodes, frozen bitmaps, fleecing jobs, exports.

For each disk of a backup session (DESIGN.md decision 3)::

    live disk (top node) ◄── backing ── scratch qcow2 node  ◄── QEMU NBD export (read-only)
        │ copy-before-write (blockdev-backup sync=none)  ▲      with frozen bitmaps
        └──────────── old data, before each new write ───┘

Everything nbdsrv creates in QEMU for a session is named in a :class:`FleecePlan`, written
to disk before the first QMP command, so :func:`teardown` can remove exactly those things —
at the end of a session, after a failed begin, or after a daemon crash. Teardown is
idempotent: what is already gone is skipped.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import QEMUError, QMPError
from .images import scratch_file
from .monitor import Monitor
from .names import qemu_name, tag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskPlan:
    """What one disk of a session needs in QEMU."""

    disk: str
    top_node: str
    size: int
    scratch_file: str
    scratch_node: str
    job: str
    export: str
    # frozen bitmap name on the scratch node → (checkpoint, granularity, [{node, name}...])
    bitmaps: Mapping[str, tuple[str, int, tuple[tuple[str, str], ...]]] = field(
        default_factory=dict
    )


@dataclass(frozen=True)
class FleecePlan:
    session: str
    nbd_socket: str
    # True when nbdsrv starts QEMU's NBD server for this session (and so stops it after).
    start_nbd_server: bool
    disks: tuple[DiskPlan, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FleecePlan":
        disks = tuple(
            DiskPlan(
                **{
                    **d,
                    "bitmaps": {
                        k: (v[0], int(v[1]), tuple((n, b) for n, b in v[2]))
                        for k, v in d.get("bitmaps", {}).items()
                    },
                }
            )
            for d in data["disks"]
        )
        return cls(data["session"], data["nbd_socket"], bool(data["start_nbd_server"]), disks)


def scratch_node_options(plan: DiskPlan) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": plan.scratch_node,
        "file": scratch_file(plan.scratch_file),
        "backing": plan.top_node,
    }


def freeze_actions(plan: DiskPlan) -> list[tuple[str, dict[str, Any]]]:
    """Transaction actions: disabled transient bitmaps on the scratch node, merged from the
    checkpoint segments — frozen at the instant of the transaction."""
    actions: list[tuple[str, dict[str, Any]]] = []
    for name, (_, granularity, sources) in plan.bitmaps.items():
        actions.append(
            (
                "block-dirty-bitmap-add",
                {
                    "node": plan.scratch_node,
                    "name": name,
                    "granularity": granularity,
                    "persistent": False,
                    "disabled": True,
                },
            )
        )
        actions.append(
            (
                "block-dirty-bitmap-merge",
                {
                    "node": plan.scratch_node,
                    "target": name,
                    "bitmaps": [{"node": node, "name": bitmap} for node, bitmap in sources],
                },
            )
        )
    return actions


def backup_action(plan: DiskPlan) -> tuple[str, dict[str, Any]]:
    return (
        "blockdev-backup",
        {
            "job-id": plan.job,
            "device": plan.top_node,
            "target": plan.scratch_node,
            "sync": "none",
        },
    )


async def start_nbd_server(monitor: Monitor, socket_path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    try:
        await monitor.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket_path}}}
        )
    except QMPError as e:
        if "already running" in e.desc:
            raise QEMUError(
                "QEMU already runs an NBD server and QEMU allows only one; nbdsrv needs its "
                "own to export the point in time (stop the other NBD server)"
            ) from e
        raise


async def add_export(monitor: Monitor, plan: DiskPlan) -> None:
    await monitor.execute(
        "block-export-add",
        {
            "type": "nbd",
            "id": plan.export,
            "node-name": plan.scratch_node,
            "name": plan.export,
            "writable": False,
            "bitmaps": list(plan.bitmaps),
        },
    )


async def bitmap_counts(monitor: Monitor, node: str) -> dict[str, int]:
    """Dirty byte counts of the bitmaps on ``node``."""
    for info in await monitor.execute("query-named-block-nodes", {"flat": True}):
        if info.get("node-name") == node:
            return {
                b["name"]: int(b["count"]) for b in info.get("dirty-bitmaps", []) if "name" in b
            }
    return {}


async def _gone(monitor: Monitor, query: str, key: str, value: str, timeout: float) -> None:
    """Wait until ``query`` no longer lists an item with ``key`` == ``value``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        items = await monitor.execute(query)
        if not any(item.get(key) == value for item in items):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise QEMUError(f"{value} is still in {query} after {timeout:g}s")
        await asyncio.sleep(0.02)


async def _quietly(monitor: Monitor, command: str, arguments: Mapping[str, Any]) -> None:
    """Run a teardown command; "not found" means it is already gone."""
    try:
        await monitor.execute(command, arguments)
    except QMPError as e:
        log.debug("%s: %s (already gone?)", command, e.desc)


async def teardown(monitor: Monitor | None, plan: FleecePlan, timeout: float = 30.0) -> None:
    """Remove everything of ``plan`` from QEMU and disk, newest first. With no monitor (QEMU
    is gone) only the files are removed."""
    if monitor is not None and monitor.connected:
        for disk in plan.disks:
            await _quietly(monitor, "block-export-del", {"id": disk.export, "mode": "hard"})
        for disk in plan.disks:
            await _gone(monitor, "query-block-exports", "id", disk.export, timeout)
        for disk in plan.disks:
            await _quietly(monitor, "block-job-cancel", {"device": disk.job, "force": True})
        for disk in plan.disks:
            await _gone(monitor, "query-block-jobs", "device", disk.job, timeout)
        for disk in plan.disks:
            await _quietly(monitor, "blockdev-del", {"node-name": disk.scratch_node})
        if plan.start_nbd_server:
            await _quietly(monitor, "nbd-server-stop", {})
    for disk in plan.disks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(disk.scratch_file)
    if plan.start_nbd_server:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(plan.nbd_socket)


async def stop_copy_before_write(monitor: Monitor, plan: FleecePlan) -> None:
    """Stop copying old data into the scratch images (the point in time is given up)."""
    for disk in plan.disks:
        await _quietly(monitor, "block-job-cancel", {"device": disk.job, "force": True})


def frozen_bitmap_name(session: str, checkpoint: str) -> str:
    return f"nbdsrv-{session}-{checkpoint}"


def session_names(session: str, disk: str) -> tuple[str, str, str]:
    """(scratch node, job id, QEMU export name) of one disk of a session: a hash of the disk
    id, never the id itself (node names are at most 31 characters)."""
    base = qemu_name("nbdsrv", session, tag(disk))
    return base, base, base


def plan_disk(
    session: str,
    disk: str,
    top_node: str,
    size: int,
    scratch_dir: str,
    bitmaps: Sequence[tuple[str, int, Sequence[tuple[str, str]]]],
) -> DiskPlan:
    """``bitmaps``: (checkpoint, granularity, [(node, bitmap name) segments])."""
    node, job, export = session_names(session, disk)
    return DiskPlan(
        disk=disk,
        top_node=top_node,
        size=size,
        scratch_file=os.path.join(scratch_dir, f"{session}-{tag(disk)}.qcow2"),
        scratch_node=node,
        job=job,
        export=export,
        bitmaps={
            frozen_bitmap_name(session, ckpt): (ckpt, granularity, tuple(sources))
            for ckpt, granularity, sources in bitmaps
        },
    )
