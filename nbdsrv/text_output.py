"""How each control operation's result reads for people (the CLI without ``--json``).

Each function takes the request's arguments and the operation's result (the JSON document
``--json`` prints) and returns the text; operations.py names one per operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the types only: a client command loads no backend module
    from .backends.views import CheckpointInfo, VMStatus

Args = dict[str, Any]


def status(args: Args, status: dict[str, Any]) -> str:
    lines = [
        f"daemon pid {status['pid']}, state {status['state_dir']}",
        "listening on: " + ", ".join(status["listen"]),
        f"exports ({len(status['exports'])}):",
    ]
    for export in status["exports"]:
        lines.append(f"  {export['name']}: {export['size']} bytes, {', '.join(export['contexts'])}")
    vms: list[VMStatus] = status["vms"]
    lines.append(f"VMs ({len(vms)}):")
    for vm in vms:
        if vm.get("backend") == "libvirt":
            connected = "connected" if vm.get("connected") else "not connected"
            via = f"libvirt {vm.get('libvirt')} {connected}"
        else:
            connected = "connected" if vm.get("qmp_connected") else "not connected"
            if vm.get("qmp_connected") and vm.get("responsive") is False:
                connected = "connected but unresponsive"
            via = f"QMP {connected}"
        frozen = ", GUEST MAY BE FROZEN (thaw retried)" if vm.get("guest_frozen") else ""
        lines.append(f"  {vm['name']}: {via}, disks {', '.join(vm.get('disks', []))}{frozen}")
    lines.append(f"sessions ({len(status['sessions'])}):")
    for session in status["sessions"]:
        lines.append(f"  {session['id']}: VM {session['vm']}, {session.get('state', '')}")
    return "\n".join(lines)


def hello(args: Args, hello: dict[str, Any]) -> str:
    return (
        f"nbdsrv {hello['nbdsrv']}, control protocol version {hello['protocol']}\n"
        "operations: " + ", ".join(hello["operations"])
    )


def checkpoint_created(args: Args, result: dict[str, Any]) -> str:
    parent = f" (parent {result['parent']})" if result["parent"] else ""
    return f"checkpoint {result['name']} created{parent}"


def checkpoints(args: Args, result: list[CheckpointInfo]) -> str:
    lines = [
        f"{c['name']}\t{c['created']}\tparent={c['parent'] or '-'}\t"
        + ("valid" if c["valid"] else f"INVALID: {c['reason']}")
        + ("" if c.get("persistent", True) else "\tin memory")
        for c in result
    ]
    return "\n".join(lines) or f"VM {args['vm']} has no checkpoints"


def checkpoint_deleted(args: Args, result: dict[str, Any]) -> str:
    return f"checkpoint {args['name']} deleted"


def session(args: Args, session: dict[str, Any]) -> str:
    lines = [
        f"session {session['id']} of VM {session['vm']}: {session['state']}"
        + (f" ({session['error']})" if session.get("error") else ""),
        f"  checkpoint {session['checkpoint'] or '-'}, from {session['from'] or '- (full)'}",
    ]
    for disk, info in session["disks"].items():
        lines.append(f"  {disk}: {info['uri']}  contexts: {', '.join(info['contexts'])}")
    return "\n".join(lines)


def sessions(args: Args, sessions: list[dict[str, Any]]) -> str:
    """One line per session disk, with the share of its dirty (or, for a full backup, all)
    bytes read so far."""
    rows = [("SESSION", "STATE", "STARTED", "DISK", "READ", "OF", "%", "CLIENTS")]
    for session in sessions:
        for disk, info in session["disks"].items():
            dirty = info.get("dirty_bytes") or {}
            wanted = next(iter(dirty.values())) if len(dirty) == 1 else info["size"]
            read = info.get("bytes_read", 0)
            share = f"{100 * min(read, wanted) / wanted:.1f}" if wanted else "100.0"
            rows.append(
                (
                    session["id"],
                    session["state"],
                    session.get("started", ""),
                    disk,
                    str(read),
                    str(wanted),
                    share,
                    str(info.get("clients", 0)),
                )
            )
    if len(rows) == 1:
        return f"VM {args['vm']} has no backup session"
    return table(rows)


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def session_ended(args: Args, result: dict[str, Any]) -> str:
    return f"session {args['id']} ended"


def snapshot_created(args: Args, result: dict[str, Any]) -> str:
    lines = [f"{disk}: {file}" for disk, file in result["overlays"].items()]
    return "\n".join(["snapshot created:", *lines])


def snapshot_committed(args: Args, result: dict[str, Any]) -> str:
    return "\n".join(f"{disk}: {file} committed" for disk, file in result["committed"].items())


def restore(args: Args, session: dict[str, Any]) -> str:
    line = f"restore {session['id']}: {session['state']}"
    if session.get("error"):
        line += f" ({session['error']})"
    into = f"{session['vm']}/{session['disk']}" if session.get("vm") else session["image"]
    lines = [line, f"  into {into} ({session['format']}, {session['size']} bytes)"]
    if session.get("source"):
        lines.append(f"  from {session['source']}")
    lines.append(f"  {session['uri'] or session['export']}")
    return "\n".join(lines)


def restores(args: Args, sessions: list[dict[str, Any]]) -> str:
    rows = [("RESTORE", "STATE", "STEP", "INTO", "WRITTEN", "STREAMED", "MIRRORED", "OF")]
    for session in sessions:
        into = f"{session['vm']}/{session['disk']}" if session.get("vm") else session["image"]
        streamed = str(session["streamed_bytes"]) if session.get("source") else "-"
        mirrored = session.get("mirrored_bytes")
        rows.append(
            (
                session["id"],
                session["state"],
                session.get("step") or "-",
                into,
                str(session["written_bytes"]),
                streamed,
                "-" if mirrored is None else str(mirrored),
                str(session["size"]),
            )
        )
    return table(rows) if len(rows) > 1 else "no restore session"


def restore_ended(args: Args, result: dict[str, Any]) -> str:
    if result.get("vm") is not None:
        where = f"{result['vm']}/{result['disk']} ({result['image']})"
        return f"restore {result['id']} ended: {where} is the VM's again"
    return f"restore {result['id']} ended: {result['image']} is closed"
