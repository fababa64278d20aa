"""A point in time over QEMU's disks: copy-before-write filters, snapshot-access nodes,
frozen bitmaps, read-only exports (docs/architecture.md "Holding the
point in time"; facts in docs/research/fleecing-7.2.md).

For each disk of a backup session::

    writer ─► device / throttle node ─► copy-before-write filter ─► disk's root node
                                         │ on-cbw-error=break-snapshot
                                         ▼ old data, before each new write
                                       scratch qcow2 (no backing) ◄─ frozen bitmaps
    QEMU NBD export (read-only) ─► snapshot-access node ─► the filter (reads the point in
                                                            time: scratch, else the disk)

The filter enters the writers' path by ``qom-set <device> drive`` (a guest device) or by one
``blockdev-reopen`` of the passthrough throttle nodes a qemu-storage-daemon exports (changing
their ``file``). Why this and not ``blockdev-backup sync=none``: while the snapshot-access
node exists QEMU refuses to take the filter out of the path or delete it, so a read can
never see data newer than the point in time; a failed copy breaks the snapshot (its reads
fail) and never the guest's write. A disk with neither a device nor such a node is refused:
QEMU 7.2 has no other way to put a filter above a node that a BlockBackend uses.

Everything nbdsrv creates in QEMU for a session is named in a :class:`FleecePlan`, written
to disk before the first QMP command, so :func:`teardown` removes exactly those things — at
the end of a session, after a failed begin, or after a daemon crash — and says whether QEMU
still holds any of them (then the record must stay, for the next reconnect).
"""

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .chain import FORMAT_DRIVERS, BlockState
from .errors import QEMUError, QMPError
from .images import scratch_file
from .monitor import Monitor, raise_first_error, transaction_command

log = logging.getLogger(__name__)

# A copy into the scratch image slower than this breaks the snapshot instead of holding up
# the guest's write (seconds).
CBW_TIMEOUT = 30
SWITCH_QDEV = "qdev"
SWITCH_REOPEN = "reopen"
_OURS = frozenset({"copy-before-write", "snapshot-access"})


@dataclass(frozen=True)
class DiskPlan:
    """What one disk of a session needs in QEMU."""

    disk: str
    top_node: str
    size: int
    scratch_file: str
    scratch_node: str
    export: str
    # The scratch image's file node, named so that QEMU's write threshold can watch it
    # (--scratch-limit); "" in records of nbdsrv before it.
    scratch_file_node: str = ""
    cbw_node: str = ""
    access_node: str = ""
    # How the filter enters the path: SWITCH_QDEV (qom-set of the device at switch_target)
    # or SWITCH_REOPEN (the throttle node switch_target, of throttle_group).
    switch: str = ""
    switch_target: str = ""
    # The node the filter sits on: the device's root node, or the throttle node's child.
    below: str = ""
    throttle_group: str = ""
    # Records of nbdsrv before the filter design name a blockdev-backup job.
    job: str = ""
    # frozen bitmap name on the scratch node → (checkpoint, granularity, [{node, name}...])
    bitmaps: Mapping[str, tuple[str, int, tuple[tuple[str, str], ...]]] = field(
        default_factory=dict
    )
    # The direct export: QEMU's own export of the point in time, offering "since C" contexts
    # as QEMU bitmaps (docs/architecture.md "Direct exports"). Empty in records of nbdsrv
    # before it.
    direct_export: str = ""
    # The contexts' suffixes: bitmaps of these names on the snapshot-access node.
    direct_contexts: tuple[str, ...] = ()
    # How they are built, in order: (node, bitmap, granularity, [(node, bitmap) merged in]).
    direct_bitmaps: tuple[tuple[str, str, int, tuple[tuple[str, str], ...]], ...] = ()


@dataclass(frozen=True)
class FleecePlan:
    session: str
    nbd_socket: str
    # True when nbdsrv starts QEMU's NBD server for this session (and so stops it after).
    start_nbd_server: bool
    disks: tuple[DiskPlan, ...]
    # True between nbdsrv's `stop` of a running VM and its `cont`: a restart resumes it.
    paused: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FleecePlan":
        known = {f.name for f in fields(DiskPlan)}
        disks = tuple(
            DiskPlan(
                **{
                    **{k: v for k, v in d.items() if k in known},
                    "bitmaps": {
                        k: (v[0], int(v[1]), tuple((n, b) for n, b in v[2]))
                        for k, v in d.get("bitmaps", {}).items()
                    },
                    "direct_contexts": tuple(d.get("direct_contexts", ())),
                    "direct_bitmaps": tuple(
                        (node, name, int(granularity), tuple((n, b) for n, b in sources))
                        for node, name, granularity, sources in d.get("direct_bitmaps", ())
                    ),
                }
            )
            for d in data["disks"]
        )
        return cls(
            data["session"],
            data["nbd_socket"],
            bool(data["start_nbd_server"]),
            disks,
            bool(data.get("paused", False)),
        )


# -- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Switch:
    kind: str
    target: str
    below: str
    group: str = ""


def find_switches(state: BlockState, roots: Sequence[str] | None) -> dict[str, Switch]:
    """Disk id → how its writers' path can take a copy-before-write filter.

    Raises QEMUError (one line) for a disk nbdsrv cannot hold a point in time for."""
    by_name = {str(n["node-name"]): n for n in state.nodes}
    switches: dict[str, Switch] = {}
    for disk in state.disks(roots):
        switches[disk.id] = _switch(
            disk.id, disk.device, disk.qdev, disk.top, state.block, by_name, state.exports
        )
    return switches


def _switch(
    disk: str,
    device: str | None,
    qdev: str | None,
    top: Any,
    block: Sequence[Mapping[str, Any]],
    by_name: Mapping[str, Mapping[str, Any]],
    exports: Sequence[Mapping[str, Any]],
) -> Switch:
    if device or qdev:
        entry = next(
            (
                e
                for e in block
                if (device and e.get("device") == device) or (qdev and e.get("qdev") == qdev)
            ),
            None,
        )
        root = str(((entry or {}).get("inserted") or {}).get("node-name", ""))
        if by_name.get(root, {}).get("drv") in _OURS:
            raise QEMUError(
                f"disk {disk} already has a copy-before-write filter (another backup of it "
                "is running)"
            )
        path = (entry or {}).get("qdev")
        if path and root:
            path = str(path)
            return Switch(
                SWITCH_QDEV, path if path.startswith("/") else f"/machine/peripheral/{path}", root
            )
        raise QEMUError(
            f"disk {disk} has no guest device (-drive if=none without -device): QEMU 7.2 "
            "cannot put a copy-before-write filter into its path, so nbdsrv cannot hold a "
            "point in time for it"
        )
    export = next((e for e in exports if e.get("id") == disk), None)
    node = by_name.get(str((export or {}).get("node-name", "")))
    if node is not None and node.get("drv") == "throttle":
        options = _json_options(str(node.get("file", "")))
        group, child = options.get("throttle-group"), options.get("file")
        if group and isinstance(child, dict) and child.get("driver") in FORMAT_DRIVERS:
            return Switch(SWITCH_REOPEN, str(node["node-name"]), top.node_name, str(group))
    raise QEMUError(
        f"disk {disk} is exported without a passthrough node: QEMU 7.2 cannot put a "
        "copy-before-write filter under an export, so nbdsrv cannot hold a point in time "
        "for it (put a throttle node with an unlimited throttle-group under the export)"
    )


def _json_options(filename: str) -> dict[str, Any]:
    if not filename.startswith("json:"):
        return {}
    try:
        options = json.loads(filename[len("json:") :])
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}


def frozen_bitmap_name(session: str, checkpoint: str) -> str:
    return f"nbdsrv-{session}-{checkpoint}"


def plan_disk(
    session: str,
    index: int,
    disk: str,
    top_node: str,
    size: int,
    scratch_dir: str,
    switch: Switch,
    bitmaps: Sequence[tuple[str, int, Sequence[tuple[str, str]]]],
    direct: Mapping[str, str] | None = None,
) -> DiskPlan:
    """``bitmaps``: (checkpoint, granularity, [(node, bitmap name) segments]), oldest
    first. ``direct``: context suffix → checkpoint, for the direct export (None: no direct
    export); every checkpoint of ``bitmaps`` from the oldest of them on must have its
    frozen bitmap. Node names use the disk's index, not its id, so they stay within QEMU's
    31 characters."""
    base = f"nbdsrv-{session[:8]}"
    scratch_node = f"{base}-scr{index}"
    access_node = f"{base}-acc{index}"
    return DiskPlan(
        disk=disk,
        top_node=top_node,
        size=size,
        scratch_file=os.path.join(scratch_dir, f"{session}-{index}.qcow2"),
        scratch_node=scratch_node,
        scratch_file_node=f"{base}-sf{index}",
        export=f"nbdsrv-{session}-{index}",
        cbw_node=f"{base}-cbw{index}",
        access_node=access_node,
        switch=switch.kind,
        switch_target=switch.target,
        below=switch.below,
        throttle_group=switch.group,
        bitmaps={
            frozen_bitmap_name(session, ckpt): (ckpt, granularity, tuple(sources))
            for ckpt, granularity, sources in bitmaps
        },
        direct_export="" if direct is None else f"nbdsrv-{session}-{index}-direct",
        direct_contexts=tuple(direct or {}),
        direct_bitmaps=_since_bitmaps(
            session, scratch_node, access_node, [(c, g) for c, g, _ in bitmaps], direct or {}
        ),
    )


def _since_bitmaps(
    session: str,
    scratch_node: str,
    access_node: str,
    checkpoints: Sequence[tuple[str, int]],
    contexts: Mapping[str, str],
) -> tuple[tuple[str, str, int, tuple[tuple[str, str], ...]], ...]:
    """The bitmaps that make the direct export's contexts, newest first, each "since C" =
    C's frozen bitmap OR "since" the next checkpoint, at C's granularity — exactly the
    relay's suffix OR (backup/sessions.py), coarsening included. Offered ones are named as
    their context on the snapshot-access node (which holds nothing else); the others live on
    the scratch node under names with a ``:``, which no checkpoint name has."""
    if not contexts:
        return ()
    label_of = {checkpoint: label for label, checkpoint in contexts.items()}
    names = [c for c, _ in checkpoints]
    oldest = min(names.index(c) for c in contexts.values())
    steps: list[tuple[str, str, int, tuple[tuple[str, str], ...]]] = []
    later: tuple[str, str] | None = None
    for checkpoint, granularity in reversed(checkpoints[oldest:]):
        label = label_of.get(checkpoint)
        here = (
            (access_node, label)
            if label is not None
            else (scratch_node, f"nbdsrv-{session}:since:{checkpoint}")
        )
        sources = ((scratch_node, frozen_bitmap_name(session, checkpoint)),)
        steps.append((*here, granularity, sources + ((later,) if later else ())))
        later = here
    return tuple(steps)


# -- building -----------------------------------------------------------------------------


def filter_commands(plan: DiskPlan) -> list[tuple[str, dict[str, Any]]]:
    """The scratch node and the filter above the disk — not yet in anybody's path (for
    `Monitor.execute_many`: when the first fails the second fails too, harmlessly)."""
    file = scratch_file(plan.scratch_file)
    if plan.scratch_file_node:
        file["node-name"] = plan.scratch_file_node
    return [
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": plan.scratch_node, "file": file},
        ),
        (
            "blockdev-add",
            {
                "driver": "copy-before-write",
                "node-name": plan.cbw_node,
                "file": plan.below,
                "target": plan.scratch_node,
                "on-cbw-error": "break-snapshot",
                "cbw-timeout": CBW_TIMEOUT,
            },
        ),
    ]


async def run_state(monitor: Monitor) -> bool | None:
    """Whether the VM's vCPUs run (True/False), or None when QEMU cannot pause at all
    (qemu-storage-daemon has no run state)."""
    try:
        status = await monitor.execute("query-status")
    except QMPError as e:
        status = e
    return run_state_of(status)


def run_state_of(status: Any) -> bool | None:
    """:func:`run_state` from the answer (or `QMPError`) of ``query-status``."""
    if isinstance(status, QMPError):
        if status.error_class == "CommandNotFound":
            return None
        raise status
    return bool(status.get("running"))


def switch_in(disks: Sequence[DiskPlan]) -> list[tuple[str, dict[str, Any]]]:
    """The commands that put every disk's filter into its writers' path: this is the point
    in time. The throttle nodes all change in ONE reopen, which drains them together."""
    commands: list[tuple[str, dict[str, Any]]] = [
        ("qom-set", {"path": d.switch_target, "property": "drive", "value": d.cbw_node})
        for d in disks
        if d.switch == SWITCH_QDEV
    ]
    reopen = [_throttle(d, d.cbw_node) for d in disks if d.switch == SWITCH_REOPEN]
    if reopen:
        commands.append(("blockdev-reopen", {"options": reopen}))
    return commands


def _throttle(disk: DiskPlan, file: str) -> dict[str, Any]:
    return {
        "driver": "throttle",
        "node-name": disk.switch_target,
        "throttle-group": disk.throttle_group,
        "file": file,
    }


def freeze_actions(plan: DiskPlan) -> list[tuple[str, dict[str, Any]]]:
    """Transaction actions: disabled transient bitmaps on the scratch node, merged from the
    checkpoint segments."""
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
    # The direct exports are served here to local clients: only the daemon's user may
    # connect (QEMU creates the socket with its own umask). A QEMU of another user keeps
    # its mode; the state directory (0700) still guards it.
    try:
        os.chmod(socket_path, 0o600)
    except PermissionError:
        log.warning("cannot chmod 0600 QEMU's NBD socket %s (QEMU's user owns it)", socket_path)


def export_commands(plan: DiskPlan) -> list[tuple[str, dict[str, Any]]]:
    """The snapshot-access node and its read-only export with the frozen bitmaps, and the
    direct export (for `Monitor.execute_many`)."""
    return [
        (
            "blockdev-add",
            {"driver": "snapshot-access", "node-name": plan.access_node, "file": plan.cbw_node},
        ),
        *direct_bitmap_commands(plan),
        (
            "block-export-add",
            {
                "type": "nbd",
                "id": plan.export,
                "node-name": plan.access_node,
                "name": plan.export,
                "writable": False,
                # The {node, name} form: the bitmaps are on the scratch node, not below the
                # export.
                "bitmaps": [{"node": plan.scratch_node, "name": name} for name in plan.bitmaps],
            },
        ),
        *direct_export_commands(plan),
    ]


def direct_bitmap_commands(plan: DiskPlan) -> list[tuple[str, Any]]:
    """One transaction building the direct export's "since C" bitmaps from the frozen ones
    (disabled, transient; QEMU merges at the target's granularity, as the relay does). They
    go with their nodes."""
    actions: list[tuple[str, dict[str, Any]]] = []
    for node, name, granularity, sources in plan.direct_bitmaps:
        actions.append(
            (
                "block-dirty-bitmap-add",
                {
                    "node": node,
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
                    "node": node,
                    "target": name,
                    "bitmaps": [{"node": n, "name": b} for n, b in sources],
                },
            )
        )
    return [transaction_command(actions)] if actions else []


def direct_export_commands(plan: DiskPlan) -> list[tuple[str, dict[str, Any]]]:
    """The direct export: QEMU serves the point in time and its "since C" bitmaps itself;
    the context of bitmap L is ``qemu:dirty-bitmap:L``."""
    if not plan.direct_export:
        return []
    return [
        (
            "block-export-add",
            {
                "type": "nbd",
                "id": plan.direct_export,
                "node-name": plan.access_node,
                "name": plan.direct_export,
                "writable": False,
                "bitmaps": [
                    {"node": plan.access_node, "name": label} for label in plan.direct_contexts
                ],
            },
        )
    ]


# -- teardown -----------------------------------------------------------------------------


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


async def _quietly(
    monitor: Monitor, commands: Sequence[tuple[str, Mapping[str, Any] | None]]
) -> list[Any]:
    """Run teardown commands in one round trip (`Monitor.execute_many`); their answers. A
    refused one is logged and passed over: "not found" means it is already gone."""
    answers = await monitor.execute_many(commands)
    for (command, _), answer in zip(commands, answers, strict=True):
        if isinstance(answer, QMPError):
            log.debug("%s: %s (already gone?)", command, answer.desc)
    return answers


def _below_now(disk: DiskPlan, nodes: Sequence[Mapping[str, Any]]) -> str:
    """The node under the filter now: the planned one, unless someone put an overlay on it
    meanwhile (then the format node holding the filter's file name)."""
    by_name = {str(n["node-name"]): n for n in nodes}
    cbw = by_name.get(disk.cbw_node)
    below = by_name.get(disk.below)
    if cbw is None or below is None or below.get("file") == cbw.get("file"):
        return disk.below
    for node in nodes:
        if node.get("drv") in FORMAT_DRIVERS and node.get("file") == cbw.get("file"):
            return str(node["node-name"])
    return disk.below


def _switch_out(
    disks: Sequence[DiskPlan],
    nodes: Sequence[Mapping[str, Any]],
    block: Sequence[Mapping[str, Any]],
) -> list[tuple[str, Mapping[str, Any] | None]]:
    """The commands that take the filters out of the writers' path (only where they are in
    it), from what query-named-block-nodes and query-block show now."""
    names = {str(n["node-name"]) for n in nodes}
    on_filter = {
        str(e.get("qdev"))
        for e in block
        if (e.get("inserted") or {}).get("node-name") in {d.cbw_node for d in disks}
    }
    commands: list[tuple[str, Mapping[str, Any] | None]] = []
    reopen = []
    for disk in disks:
        if not disk.cbw_node or disk.cbw_node not in names:
            continue
        below = _below_now(disk, nodes)
        if disk.switch == SWITCH_QDEV and any(
            disk.switch_target in (q, f"/machine/peripheral/{q}") for q in on_filter
        ):
            commands.append(
                ("qom-set", {"path": disk.switch_target, "property": "drive", "value": below})
            )
        elif disk.switch == SWITCH_REOPEN:
            reopen.append(_throttle(disk, below))
    if reopen:
        commands.append(("blockdev-reopen", {"options": reopen}))
    return commands


def _exports(disks: Sequence[DiskPlan]) -> list[str]:
    """The QEMU exports of ``disks``: the relay's upstream ones and the direct ones."""
    return [e for d in disks for e in (d.export, d.direct_export) if e]


def _our_nodes(plan: FleecePlan) -> set[str]:
    return {n for d in plan.disks for n in (d.access_node, d.cbw_node, d.scratch_node) if n}


async def _dismantle(
    monitor: Monitor,
    plan: FleecePlan,
    timeout: float,
    *,
    stop_nbd_server: bool,
    unless_others_are_at_it: bool = False,
) -> Sequence[Mapping[str, Any]]:
    """Take ``plan`` out of QEMU, newest first, in the only order QEMU allows (export,
    snapshot-access node, filter out of the path, filter, scratch node), in three round
    trips; query-named-block-nodes afterwards.

    ``unless_others_are_at_it``: when one of its exports is gone already, someone else is
    taking the point in time apart; QEMUError then, with nothing more done. Two parties
    moving a device's drive at once could make nbdsrv set it to the node it already has,
    and QEMU 7.2 aborts on that (`bdrv_replace_child_noperm: Assertion old_bs != new_bs`):
    the guest would die."""
    disks = plan.disks
    # 1. The exports (hard: their clients are cut), and whether they are gone yet.
    exports = _exports(disks)
    answers = await _quietly(
        monitor,
        [
            *(("block-export-del", {"id": export, "mode": "hard"}) for export in exports),
            ("query-block-exports", None),
        ],
    )
    raise_first_error(answers[-1:])
    if unless_others_are_at_it:
        taken = [e for e, a in zip(exports, answers, strict=False) if isinstance(a, QMPError)]
        if taken:
            raise QEMUError(
                f"session {plan.session}: someone else deleted {', '.join(taken)}; what is "
                "left goes at the end, not to race them in QEMU"
            )
    listed = {e.get("id") for e in answers[-1]}
    for export in _exports(disks):
        if export in listed:
            await _gone(monitor, "query-block-exports", "id", export, timeout)
    # 2. The snapshot-access nodes, then a look at the graph without them.
    answers = await _quietly(
        monitor,
        [
            *(("blockdev-del", {"node-name": d.access_node}) for d in disks if d.access_node),
            ("query-named-block-nodes", {"flat": True}),
            ("query-block", None),
        ],
    )
    raise_first_error(answers[-2:])
    switch = _switch_out(disks, answers[-2], answers[-1])
    # Records of nbdsrv before the filter design: the job goes before its nodes can.
    if any(d.job for d in disks):
        await _quietly(monitor, switch)
        switch = []
        for disk in disks:
            if disk.job:
                await _quietly(monitor, [("block-job-cancel", {"device": disk.job, "force": True})])
                await _gone(monitor, "query-block-jobs", "device", disk.job, timeout)
    # 3. The filters out of the path, the filters and scratch nodes, and a last look.
    answers = await _quietly(
        monitor,
        [
            *switch,
            *(
                ("blockdev-del", {"node-name": node})
                for d in disks
                for node in (d.cbw_node, d.scratch_node)
                if node
            ),
            *([("nbd-server-stop", {})] if stop_nbd_server else []),
            ("query-named-block-nodes", {"flat": True}),
        ],
    )
    raise_first_error(answers[-1:])
    return list(answers[-1])


async def teardown(monitor: Monitor | None, plan: FleecePlan, timeout: float = 30.0) -> bool:
    """Remove everything of ``plan`` from QEMU, then its files. True when QEMU holds none of
    it any more. Without a connected monitor nothing is touched and the answer is False:
    QEMU may still use the scratch files."""
    if monitor is None or not monitor.connected:
        return False
    if plan.paused and await run_state(monitor) is False:
        # nbdsrv stopped the VM for the switch and did not live to resume it.
        log.warning("session %s: resuming the VM nbdsrv paused", plan.session)
        await monitor.execute("cont")
    nodes = await _dismantle(monitor, plan, timeout, stop_nbd_server=plan.start_nbd_server)
    left = _our_nodes(plan) & {str(n["node-name"]) for n in nodes}
    if left:
        raise QEMUError(f"session {plan.session}: QEMU still holds {', '.join(sorted(left))}")
    remove_files(plan)
    return True


async def give_up(monitor: Monitor, plan: FleecePlan) -> bool:
    """Give a broken point in time up at once: its exports (readers get EIO), snapshot-access
    nodes, filters (out of the guest's write path) and scratch nodes go, and the scratch
    files are deleted; the guest's writes go on. QEMU's NBD server and the record stay until
    the session ends. True when QEMU holds none of it any more."""
    if not monitor.connected:
        return False
    nodes = await _dismantle(
        monitor, plan, 30.0, stop_nbd_server=False, unless_others_are_at_it=True
    )
    if _our_nodes(plan) & {str(n["node-name"]) for n in nodes}:
        return False
    for disk in plan.disks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(disk.scratch_file)
    return True


def write_threshold_commands(
    thresholds: Mapping[str, int],
) -> list[tuple[str, dict[str, Any]]]:
    """Arm QEMU's write threshold on scratch file nodes (node → offset): QEMU sends
    BLOCK_WRITE_THRESHOLD once a write goes past it, then disarms it."""
    return [
        ("block-set-write-threshold", {"node-name": node, "write-threshold": offset})
        for node, offset in thresholds.items()
    ]


def remove_files(plan: FleecePlan) -> None:
    for path in _files(plan):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _files(plan: FleecePlan) -> Iterable[str]:
    yield from (d.scratch_file for d in plan.disks)
    if plan.start_nbd_server:
        yield plan.nbd_socket
