"""Command-line front end: `nbdsrv daemon` and the client commands (CONTRACT.md)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from . import __version__, client_json, control_client
from .config.paths import default_control, default_state_dir
from .errors import ConfigError, NbdsrvError

# A client command (status, backup begin, ...) imports only the above, which need nothing but
# the standard library's os, _socket and _json (not json: see client_json.py). Its command
# line is parsed without argparse when written plainly (_parse_plain), else argparse builds
# that command's options only. The daemon, its options and everything it needs load in
# _add_daemon_options and _cmd_daemon.
# Nor is typing imported (a sixth of a client command's start-up): annotations are never
# evaluated (the __future__ import) and the names they use are imported for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine, Sequence
    from typing import Any

    from .daemon import DaemonConfig
    from .net.address import Address

    # option: (dest, the value's type, or None for a flag)
    PlainOptions = dict[str, tuple[str, Callable[[str], object] | None]]

DEFAULT_LISTEN = "tcp:127.0.0.1:10809"


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"bad {what} {text!r}: use NAME=VALUE")
    return name, value


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH", help="control socket of the daemon")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _add_quiesce_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiesce",
        action="store_true",
        help="freeze the guest's filesystems for the instant (needs --qga on the daemon)",
    )


# Client command lines as scripts write them, parsed without argparse: importing it, building
# its parser and the help formatter it makes for every option (which imports shutil and,
# through gettext, locale) take a quarter of a client command's start-up. Taken here is only
# the plainest form: the command's words, its positionals, then options spelt out in full,
# each value a word of its own that does not start with "-". Anything else (help, an
# abbreviation, --option=value, a mistake) goes to argparse, which parses it the same way
# (tests/unit/test_cli_parse.py) or explains what is wrong.
_PLAIN_OPTIONS: PlainOptions = {"--control": ("control", str), "--json": ("json", None)}
_QUIESCE: PlainOptions = {"--quiesce": ("quiesce", None)}
# command words: (positionals, options besides --control and --json)
_PLAIN_LINES: dict[tuple[str, ...], tuple[tuple[str, ...], PlainOptions]] = {
    ("status",): ((), {}),
    ("checkpoint", "create"): (
        ("vm",),
        {"--name": ("name", str), "--granularity": ("granularity", int), **_QUIESCE},
    ),
    ("checkpoint", "list"): (("vm",), {}),
    ("checkpoint", "delete"): (("vm", "name"), {}),
    ("backup", "begin"): (
        ("vm",),
        {
            "--from": ("from_checkpoint", str),
            "--checkpoint": ("checkpoint", str),
            "--no-checkpoint": ("no_checkpoint", None),
            "--all-checkpoints": ("all_checkpoints", None),
            "--bitmap-name": ("bitmap_name", str),
            **_QUIESCE,
        },
    ),
    ("backup", "list"): (("vm",), {}),
    ("backup", "end"): (("vm", "id"), {}),
    ("snapshot", "create"): (("vm",), {"--dir": ("dir", str)}),
    ("snapshot", "commit"): (("vm",), {}),
}


def _parse_plain(argv: Sequence[str]) -> SimpleNamespace | None:
    """A client command line in its plainest form (above), parsed as argparse parses it; None
    for any other line."""
    words = tuple(argv[:1]) if tuple(argv[:1]) in _PLAIN_LINES else tuple(argv[:2])
    if words not in _PLAIN_LINES:
        return None
    positionals, own_options = _PLAIN_LINES[words]
    options = {**own_options, **_PLAIN_OPTIONS}
    values: dict[str, object] = {"command": words[0]}
    if len(words) == 2:
        values["action"] = words[1]
    values.update((dest, False if convert is None else None) for dest, convert in options.values())
    rest = list(argv[len(words) :])
    given, rest = rest[: len(positionals)], rest[len(positionals) :]
    if len(given) < len(positionals) or any(word.startswith("-") for word in given):
        return None
    values.update(zip(positionals, given, strict=True))
    while rest:
        option = options.get(rest.pop(0))
        if option is None:
            return None
        dest, convert = option
        if convert is None:
            values[dest] = True
            continue
        if not rest or rest[0].startswith("-"):
            return None
        try:
            values[dest] = convert(rest.pop(0))
        except ValueError:
            return None
    if values.get("checkpoint") is not None and values.get("no_checkpoint"):
        return None  # argparse says that the two exclude each other
    return SimpleNamespace(**values)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line. With ``command``, only that command gets its options; the others keep
    their name and help, which is all that `nbdsrv --help` and the message for an unknown
    command show. Building every command's options takes a fifth of a client command's time."""
    import argparse

    parser = argparse.ArgumentParser(prog="nbdsrv", description="NBD backup server for QEMU")
    parser.add_argument("--version", action="version", version=f"nbdsrv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_options, _) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text)
        if command is None or command == name:
            add_options(subparser)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command argparse will run: the first word that is not an option, since no option
    before it takes a value (only -h and --version are there); None for an unknown one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("image_paths", nargs="+", metavar="IMAGE", help="disk images, in order")
    serve.add_argument("--name", metavar="VM", help="VM name (default: first image's file stem)")
    _add_daemon_options(serve)


def _add_checkpoint_actions(checkpoint: argparse.ArgumentParser) -> None:
    ckpt = checkpoint.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = ckpt.add_parser("create", help="a checkpoint over all disks of VM, atomically")
    create.add_argument("vm", metavar="VM")
    create.add_argument("--name", metavar="NAME", help="default: ckpt-<UTC time>")
    create.add_argument(
        "--granularity", metavar="BYTES", type=int, help="bitmap granularity (default 65536)"
    )
    _add_quiesce_option(create)
    _add_client_options(create)
    listing = ckpt.add_parser("list", help="checkpoints of VM, oldest first")
    listing.add_argument("vm", metavar="VM")
    _add_client_options(listing)
    delete = ckpt.add_parser("delete", help="delete a checkpoint; its changes go to its parent")
    delete.add_argument("vm", metavar="VM")
    delete.add_argument("name", metavar="NAME")
    _add_client_options(delete)


def _add_backup_actions(backup: argparse.ArgumentParser) -> None:
    bk = backup.add_subparsers(dest="action", required=True, metavar="ACTION")
    begin = bk.add_parser("begin", help="fix a point in time and export every disk of VM")
    begin.add_argument("vm", metavar="VM")
    begin.add_argument(
        "--from",
        dest="from_checkpoint",
        metavar="CKPT",
        help="incremental: offer qemu:dirty-bitmap:CKPT (changed since CKPT)",
    )
    new = begin.add_mutually_exclusive_group()
    new.add_argument("--checkpoint", metavar="NAME", help="name of the new checkpoint")
    new.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not create a checkpoint at the point in time",
    )
    begin.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="offer a dirty-bitmap context for every valid checkpoint",
    )
    begin.add_argument(
        "--bitmap-name", metavar="NAME", help="name the --from context qemu:dirty-bitmap:NAME"
    )
    _add_quiesce_option(begin)
    _add_client_options(begin)
    blist = bk.add_parser("list", help="backup sessions of VM")
    blist.add_argument("vm", metavar="VM")
    _add_client_options(blist)
    end = bk.add_parser("end", help="end a backup session; its exports go")
    end.add_argument("vm", metavar="VM")
    end.add_argument("id", metavar="ID")
    _add_client_options(end)


def _add_snapshot_actions(snapshot: argparse.ArgumentParser) -> None:
    sn = snapshot.add_subparsers(dest="action", required=True, metavar="ACTION")
    screate = sn.add_parser("create", help="new qcow2 overlays on every disk of VM, atomically")
    screate.add_argument("vm", metavar="VM")
    screate.add_argument("--dir", metavar="DIR", help="where the overlays go (default: beside)")
    _add_client_options(screate)
    scommit = sn.add_parser("commit", help="commit every disk's top overlay into its backing")
    scommit.add_argument("vm", metavar="VM")
    _add_client_options(scommit)


def _add_daemon_options(daemon: argparse.ArgumentParser) -> None:
    from .config.security import add_security_options

    daemon.add_argument("--state-dir", metavar="DIR", help="metadata and scratch images")
    daemon.add_argument("--control", metavar="PATH", help="control socket (unix, mode 0600)")
    daemon.add_argument(
        "--listen", metavar="URI", action="append", help="tcp:HOST:PORT or unix:PATH (repeatable)"
    )
    daemon.add_argument(
        "--file", metavar="NAME=PATH", action="append", default=[], help="export a file read-only"
    )
    daemon.add_argument(
        "--qmp", metavar="VM=PATH", action="append", default=[], help="QMP socket of a VM"
    )
    daemon.add_argument(
        "--qemu-nbd",
        metavar="VM=PATH",
        action="append",
        default=[],
        help="unix socket of the NBD server that VM's QEMU already runs (QEMU runs only one)",
    )
    daemon.add_argument(
        "--image",
        metavar="VM=PATH[,PATH...]",
        action="append",
        default=[],
        help="start a private qemu-storage-daemon for these images",
    )
    daemon.add_argument(
        "--qga",
        metavar="VM=PATH",
        action="append",
        default=[],
        help="unix socket of a --qmp VM's QEMU guest agent, for --quiesce",
    )
    daemon.add_argument(
        "--libvirt",
        metavar="URI",
        action="append",
        default=[],
        help="follow the running domains of a libvirt connection, e.g. qemu:///system",
    )
    daemon.add_argument("--scratch-dir", metavar="DIR", help="scratch images (default: state dir)")
    daemon.add_argument(
        "--scratch-limit",
        metavar="BYTES",
        type=int,
        default=0,
        help="a session whose scratch data grows past this breaks (readers get EIO; the "
        "guest is never affected; default: no limit)",
    )
    daemon.add_argument(
        "--metrics",
        metavar="tcp:HOST:PORT",
        help="serve Prometheus metrics at GET /metrics (default: off)",
    )
    daemon.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    add_security_options(daemon)


def _config(args: SimpleNamespace) -> DaemonConfig:
    from .config.security import policy_from_args
    from .daemon import DaemonConfig
    from .net.address import parse_address

    state_dir = args.state_dir or default_state_dir()
    return DaemonConfig(
        state_dir=state_dir,
        control=args.control or default_control(state_dir),
        listen=[parse_address(a) for a in (args.listen or [DEFAULT_LISTEN])],
        files=[_name_value(f, "--file") for f in args.file],
        qmp=[_name_value(q, "--qmp") for q in args.qmp],
        qemu_nbd=dict(_name_value(q, "--qemu-nbd") for q in args.qemu_nbd),
        guest_agents=dict(_name_value(q, "--qga") for q in args.qga),
        images=_images(args),
        libvirt=list(dict.fromkeys(args.libvirt)),
        scratch_dir=args.scratch_dir,
        policy=policy_from_args(args),
        metrics=_metrics_address(args.metrics),
        scratch_limit=_non_negative(args.scratch_limit, "--scratch-limit"),
    )


def _non_negative(value: int, option: str) -> int:
    if value < 0:
        raise ConfigError(f"{option} must be 0 or more bytes")
    return value


def _metrics_address(text: str | None) -> Address | None:
    from .net.address import parse_address

    if text is None:
        return None
    address = parse_address(text)
    if address.kind != "tcp":
        raise ConfigError(f"--metrics {text}: use tcp:HOST:PORT")
    return address


def _images(args: SimpleNamespace) -> list[tuple[str, list[str]]]:
    images = []
    for text in args.image:
        name, paths = _name_value(text, "--image")
        images.append((name, [os.path.abspath(p) for p in paths.split(",") if p]))
    if getattr(args, "image_paths", None):
        name = args.name or os.path.splitext(os.path.basename(args.image_paths[0]))[0]
        images.append((name, [os.path.abspath(p) for p in args.image_paths]))
    return images


def _run_async(coro: Coroutine[Any, Any, None]) -> None:
    import asyncio

    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def _cmd_daemon(args: SimpleNamespace) -> int:
    import logging

    from .config.memory import keep_read_buffers
    from .daemon import Daemon

    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s nbdsrv[%(process)d] %(levelname)s %(name)s: %(message)s"
    )
    keep_read_buffers()
    _run_async(Daemon(_config(args)).run())
    return 0


def _print_status(status: dict[str, Any]) -> None:
    print(f"daemon pid {status['pid']}, state {status['state_dir']}")
    print("listening on: " + ", ".join(status["listen"]))
    print(f"exports ({len(status['exports'])}):")
    for export in status["exports"]:
        print(f"  {export['name']}: {export['size']} bytes, {', '.join(export['contexts'])}")
    print(f"VMs ({len(status['vms'])}):")
    for vm in status["vms"]:
        if vm.get("backend") == "libvirt":
            connected = "connected" if vm.get("connected") else "not connected"
            via = f"libvirt {vm['libvirt']} {connected}"
        else:
            connected = "connected" if vm.get("qmp_connected") else "not connected"
            if vm.get("qmp_connected") and vm.get("responsive") is False:
                connected = "connected but unresponsive"
            via = f"QMP {connected}"
        print(f"  {vm['name']}: {via}, disks {', '.join(vm.get('disks', []))}")
    print(f"sessions ({len(status['sessions'])}):")
    for session in status["sessions"]:
        print(f"  {session['id']}: VM {session['vm']}, {session.get('state', '')}")


def _cmd_serve(args: SimpleNamespace) -> int:
    return _cmd_daemon(args)


def _client(args: SimpleNamespace, op: str, **kwargs: Any) -> Any:
    return control_client.call(args.control or default_control(), op, kwargs)


def _emit(args: SimpleNamespace, result: Any, text: str) -> None:
    if args.json:
        print(client_json.dumps_indented(result))
    elif text:
        print(text)


def _cmd_checkpoint(args: SimpleNamespace) -> int:
    if args.action == "create":
        result = _client(
            args,
            "checkpoint-create",
            vm=args.vm,
            name=args.name,
            granularity=args.granularity,
            quiesce=args.quiesce,
        )
        parent = f" (parent {result['parent']})" if result["parent"] else ""
        _emit(args, result, f"checkpoint {result['name']} created{parent}")
    elif args.action == "list":
        result = _client(args, "checkpoint-list", vm=args.vm)
        lines = [
            f"{c['name']}\t{c['created']}\tparent={c['parent'] or '-'}\t"
            + ("valid" if c["valid"] else f"INVALID: {c['reason']}")
            for c in result
        ]
        _emit(args, result, "\n".join(lines) or f"VM {args.vm} has no checkpoints")
    else:
        result = _client(args, "checkpoint-delete", vm=args.vm, name=args.name)
        _emit(args, result, f"checkpoint {args.name} deleted")
    return 0


def _describe_session(session: dict[str, Any]) -> str:
    lines = [
        f"session {session['id']} of VM {session['vm']}: {session['state']}"
        + (f" ({session['error']})" if session.get("error") else ""),
        f"  checkpoint {session['checkpoint'] or '-'}, from {session['from'] or '- (full)'}",
    ]
    for disk, info in session["disks"].items():
        lines.append(f"  {disk}: {info['uri']}  contexts: {', '.join(info['contexts'])}")
    return "\n".join(lines)


def _session_table(sessions: list[dict[str, Any]]) -> str:
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
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _cmd_backup(args: SimpleNamespace) -> int:
    if args.action == "begin":
        result = _client(
            args,
            "backup-begin",
            vm=args.vm,
            **{"from": args.from_checkpoint},
            checkpoint=args.checkpoint,
            no_checkpoint=args.no_checkpoint,
            all_checkpoints=args.all_checkpoints,
            bitmap_name=args.bitmap_name,
            quiesce=args.quiesce,
        )
        _emit(args, result, _describe_session(result))
    elif args.action == "list":
        result = _client(args, "backup-list", vm=args.vm)
        _emit(args, result, _session_table(result) or f"VM {args.vm} has no backup session")
    else:
        result = _client(args, "backup-end", vm=args.vm, id=args.id)
        _emit(args, result, f"session {args.id} ended")
    return 0


def _cmd_snapshot(args: SimpleNamespace) -> int:
    if args.action == "create":
        directory = os.path.abspath(args.dir) if args.dir else None
        result = _client(args, "snapshot-create", vm=args.vm, dir=directory)
        lines = [f"{disk}: {file}" for disk, file in result["overlays"].items()]
        _emit(args, result, "\n".join(["snapshot created:", *lines]))
    else:
        if sys.stderr.isatty() and not args.json:
            result = _with_progress(args, lambda: _client(args, "snapshot-commit", vm=args.vm))
        else:
            result = _client(args, "snapshot-commit", vm=args.vm)
        lines = [f"{disk}: {file} committed" for disk, file in result["committed"].items()]
        _emit(args, result, "\n".join(lines))
    return 0


def _with_progress(args: SimpleNamespace, call: Callable[[], Any]) -> Any:
    """Run ``call`` while showing the VM's commit jobs' progress on the terminal (stderr)."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    sys.stderr.write("committing:   0.0%")
    sys.stderr.flush()
    while worker.is_alive():
        worker.join(0.25)
        if not worker.is_alive():
            break
        try:
            status = control_client.call(args.control or default_control(), "status", timeout=5)
        except NbdsrvError:
            continue
        jobs = [
            job
            for vm in status.get("vms", [])
            if vm.get("name") == args.vm
            for job in vm.get("jobs", [])
            if job.get("type") == "commit"
        ]
        done = sum(int(job.get("offset") or 0) for job in jobs)
        total = sum(int(job.get("len") or 0) for job in jobs)
        if total:
            sys.stderr.write(f"\rcommitting: {100 * done / total:5.1f}% of {total} bytes")
            sys.stderr.flush()
    # Ends the line either way; a failure's message follows on its own line.
    sys.stderr.write(
        "\rcommitting: " + ("failed" if "error" in outcome else "100.0%") + " " * 24 + "\n"
    )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _cmd_status(args: SimpleNamespace) -> int:
    status = control_client.call(args.control or default_control(), "status")
    if args.json:
        print(client_json.dumps_indented(status))
    else:
        _print_status(status)
    return 0


# name: (help, options, run), in the order `nbdsrv --help` lists them.
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[SimpleNamespace], int]],
] = {
    "daemon": ("run the server in the foreground", _add_daemon_options, _cmd_daemon),
    "serve": (
        "serve disk images through a private qemu-storage-daemon (embedded default)",
        _add_serve_options,
        _cmd_serve,
    ),
    "status": (
        "VMs, exports and sessions of a running daemon",
        _add_client_options,
        _cmd_status,
    ),
    "checkpoint": (
        "create, list and delete checkpoints",
        _add_checkpoint_actions,
        _cmd_checkpoint,
    ),
    "backup": ("pull-mode backup sessions", _add_backup_actions, _cmd_backup),
    "snapshot": (
        "external snapshots that keep checkpoints usable",
        _add_snapshot_actions,
        _cmd_snapshot,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = _parse_plain(words)
    if args is None:
        args = build_parser(_command_in(words)).parse_args(words, SimpleNamespace())
    try:
        return COMMANDS[args.command][2](args)
    except NbdsrvError as e:
        print(f"nbdsrv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
