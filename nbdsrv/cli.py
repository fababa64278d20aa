"""Command-line front end: `nbdsrv daemon`, `nbdsrv serve`, and one client command for each
control operation of operations.py (docs/reference.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .client.sync import Client
from .config.paths import default_control, default_state_dir
from .errors import ConfigError, NbdsrvError, UsageError
from .operations import GROUPS, OPERATIONS, Arg, Operation

# The daemon's modules load only in _cmd_daemon: a client command needs none of them.
if TYPE_CHECKING:
    import threading

    from .daemon import DaemonConfig
    from .net.address import Address
    from .restore.source import TLSFiles

DEFAULT_LISTEN = "tcp:127.0.0.1:10809"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as every other failure: one line, exit 1."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"bad {what} {text!r}: use NAME=VALUE")
    return name, value


# The client options that take a value (flag, metavar, help); with --json they go before
# or after the command word.
_CLIENT_OPTIONS = (
    ("--control", "PATH", "control socket of the daemon"),
    (
        "--connect",
        "nbdsrv+tls://HOST:PORT",
        "a daemon's --remote listener instead of the control socket "
        "(default $NBDSRV_CONNECT, which wins over $NBDSRV_CONTROL)",
    ),
    (
        "--tls-certificates",
        "DIR",
        "for --connect: ca-cert.pem, client-cert.pem, client-key.pem "
        "(default $NBDSRV_TLS_CERTIFICATES)",
    ),
)


def _add_client_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The client options, before the command word (``defaults``) and after it: there they
    are SUPPRESSed, so that leaving them out does not undo what was given before."""
    default: Any = None if defaults else argparse.SUPPRESS
    for flag, metavar, help_text in _CLIENT_OPTIONS:
        parser.add_argument(flag, metavar=metavar, default=default, help=help_text)
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="print one JSON document",
    )


def _add_argument(parser: argparse.ArgumentParser, arg: Arg) -> None:
    if arg.positional:
        parser.add_argument(
            arg.name,
            metavar=arg.metavar or arg.name.upper(),
            nargs=None if arg.required else "?",
            help=arg.help,
        )
    elif arg.kind == "bool":
        parser.add_argument(arg.flag, dest=arg.name, action="store_true", help=arg.help)
    else:
        parser.add_argument(
            arg.flag,
            dest=arg.name,
            metavar=arg.metavar,
            type=_ARGUMENT_TYPES.get(arg.kind, str),
            choices=arg.choices or None,
            required=arg.required,
            help=arg.help,
        )


_BYTE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_count(text: str) -> int:
    """A number of bytes: digits, optionally followed by K, M, G or T (powers of 1024, as
    qemu-img takes them; a trailing B or iB is allowed: 64M, 64MB, 64MiB)."""
    number = text.strip()
    upper = number.upper().removesuffix("IB").removesuffix("B")
    suffix = upper[-1:] if upper[-1:] in _BYTE_SUFFIXES else ""
    digits = upper[: len(upper) - len(suffix)]
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a number of bytes (digits, optionally with K, M, G or T)"
        )
    return int(digits) * _BYTE_SUFFIXES[suffix]


_ARGUMENT_TYPES: dict[str, Callable[[str], object]] = {"int": int, "bytes": byte_count}


def _add_operation(parser: argparse.ArgumentParser, op: Operation) -> None:
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for arg in op.args:
        if arg.exclusive is None:
            _add_argument(parser, arg)
            continue
        if arg.exclusive not in groups:
            groups[arg.exclusive] = parser.add_mutually_exclusive_group()
        # A group takes the same add_argument calls as its parser.
        _add_argument(groups[arg.exclusive], arg)  # type: ignore[arg-type]
    _add_client_options(parser, defaults=False)
    parser.set_defaults(run=_cmd_operation, operation=op)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line: daemon, serve and the operations' commands. With ``command`` (a
    first command word), only that command gets its options and actions; the others keep their
    name and help, which is all that `nbdsrv --help` and the message for an unknown command
    show. argparse makes a help formatter for every option it adds, so building every
    command's options would cost each client command about as much as the rest of its
    start-up."""
    # No abbreviations before the command word: command_in must see --control as written.
    parser = Parser(prog="nbdsrv", description="NBD backup server for QEMU", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"nbdsrv {__version__}")
    _add_client_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    built = {command} if command is not None else None

    def add(name: str, help_text: str) -> argparse.ArgumentParser | None:
        """A command's parser, or None when its options are not wanted."""
        sub = commands.add_parser(name, help=help_text)
        return sub if built is None or name in built else None

    if daemon := add("daemon", "run the server in the foreground"):
        _add_daemon_options(daemon)
        daemon.set_defaults(run=_cmd_daemon)
    if serve := add(
        "serve", "serve disk images through a private qemu-storage-daemon (embedded default)"
    ):
        _add_serve_options(serve)
        serve.set_defaults(run=_cmd_daemon)
    actions: dict[str, Any] = {}  # group word → its actions' subparsers (None: not built)
    for op in OPERATIONS:
        if len(op.words) == 1:
            if sub := add(op.words[0], op.help):
                _add_operation(sub, op)
            continue
        group, action = op.words
        if group not in actions:
            group_parser = add(group, GROUPS[group])
            actions[group] = group_parser and group_parser.add_subparsers(
                dest="action", required=True, metavar="ACTION"
            )
        if group_actions := actions[group]:
            _add_operation(group_actions.add_parser(action, help=op.help), op)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The command word argparse will take from ``argv``: the first word that is neither an
    option before it nor the value of one (only the client options take values there)."""
    takes_value = {flag for flag, _, _ in _CLIENT_OPTIONS}
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if word in takes_value:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("image_paths", nargs="+", metavar="IMAGE", help="disk images, in order")
    serve.add_argument("--name", metavar="VM", help="VM name (default: first image's file stem)")
    _add_daemon_options(serve)


def _add_daemon_options(daemon: argparse.ArgumentParser) -> None:
    from .config.remote import add_remote_options
    from .config.security import add_security_options

    daemon.add_argument("--state-dir", metavar="DIR", help="metadata and scratch images")
    daemon.add_argument(
        "--control",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="control socket (unix, mode 0600)",
    )
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
    add_remote_options(daemon)


def _config(args: argparse.Namespace) -> DaemonConfig:
    from .config.remote import remote_from_args
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
        remote=remote_from_args(args),
        tls_files=_tls_files(args),
    )


def _tls_files(args: argparse.Namespace) -> TLSFiles | None:
    """The daemon's certificates, also a live restore's client credentials for nbds://."""
    from .restore.source import TLSFiles

    if args.tls_cert is None or args.tls_key is None:
        return None
    return TLSFiles(args.tls_cert, args.tls_key, args.tls_ca)


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


def _images(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
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


def _cmd_daemon(args: argparse.Namespace) -> int:
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


def _request(op: Operation, args: argparse.Namespace) -> dict[str, Any]:
    request = {}
    for arg in op.args:
        value = getattr(args, arg.name)
        if arg.kind == "path" and value is not None:
            value = os.path.abspath(value)  # the daemon's working directory is not ours
        request[arg.name] = value
    return request


def _client(args: argparse.Namespace, timeout: float = 600) -> Client:
    return Client(args.connect, args.tls_certificates, control=args.control, timeout=timeout)


def _cmd_operation(args: argparse.Namespace) -> int:
    op: Operation = args.operation
    request = _request(op, args)
    with _client(args) as client:
        if op.progress_of and sys.stderr.isatty() and not args.json:
            result = _with_progress(
                lambda: _client(args, timeout=5),
                request["vm"],
                op.progress_of,
                lambda: client.call(op.name, request),
            )
        else:
            result = client.call(op.name, request)
    if args.json:
        print(json.dumps(result, indent=2))
    elif text := op.show(request, result):
        print(text)
    return 0


def _with_progress(
    status_client: Callable[[], Client], vm: str, job_type: str, call: Callable[[], Any]
) -> Any:
    """Run ``call`` while showing the progress of VM's block jobs of ``job_type`` (as QEMU
    names it: ``commit``) on the terminal (stderr); ``status_client`` gives the connection
    that asks for them."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    label = {"commit": "committing"}.get(job_type, job_type) + ":"
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    sys.stderr.write(f"{label}   0.0%")
    sys.stderr.flush()
    with status_client() as client:
        _show_progress(client, worker, label, vm, job_type)
    # Ends the line either way; a failure's message follows on its own line.
    sys.stderr.write(
        f"\r{label} " + ("failed" if "error" in outcome else "100.0%") + " " * 24 + "\n"
    )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _show_progress(
    client: Client, worker: threading.Thread, label: str, vm: str, job_type: str
) -> None:
    while worker.is_alive():
        worker.join(0.25)
        if not worker.is_alive():
            break
        try:
            status = client.status()
        except NbdsrvError:
            continue
        jobs = [
            job
            for entry in status.get("vms", [])
            if entry.get("name") == vm
            for job in entry.get("jobs", [])
            if job.get("type") == job_type
        ]
        done = sum(int(job.get("offset") or 0) for job in jobs)
        total = sum(int(job.get("len") or 0) for job in jobs)
        if total:
            sys.stderr.write(f"\r{label} {100 * done / total:5.1f}% of {total} bytes")
            sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        words = sys.argv[1:] if argv is None else argv
        args = build_parser(command_in(words)).parse_args(words)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except NbdsrvError as e:
        print(f"nbdsrv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
