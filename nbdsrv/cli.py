"""Command-line front end: `nbdsrv daemon` and the client commands (CONTRACT.md)."""

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__, control
from .daemon import Daemon, DaemonConfig
from .errors import ConfigError, NbdsrvError
from .net.address import parse_address
from .paths import default_control, default_state_dir

DEFAULT_LISTEN = "tcp:127.0.0.1:10809"


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"bad {what} {text!r}: use NAME=VALUE")
    return name, value


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH", help="control socket of the daemon")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdsrv", description="NBD backup server for QEMU")
    parser.add_argument("--version", action="version", version=f"nbdsrv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = sub.add_parser("daemon", help="run the server in the foreground")
    daemon.add_argument("--state-dir", metavar="DIR", help="metadata and scratch images")
    daemon.add_argument("--control", metavar="PATH", help="control socket (unix, mode 0600)")
    daemon.add_argument(
        "--listen", metavar="URI", action="append", help="tcp:HOST:PORT or unix:PATH (repeatable)"
    )
    daemon.add_argument(
        "--file", metavar="NAME=PATH", action="append", default=[], help="export a file read-only"
    )
    daemon.add_argument("-v", "--verbose", action="count", default=0, help="more logging")

    status = sub.add_parser("status", help="VMs, exports and sessions of a running daemon")
    _add_client_options(status)
    return parser


def _config(args: argparse.Namespace) -> DaemonConfig:
    state_dir = args.state_dir or default_state_dir()
    return DaemonConfig(
        state_dir=state_dir,
        control=args.control or default_control(state_dir),
        listen=[parse_address(a) for a in (args.listen or [DEFAULT_LISTEN])],
        files=[_name_value(f, "--file") for f in args.file],
    )


def _run_async(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def _cmd_daemon(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s nbdsrv[%(process)d] %(levelname)s %(name)s: %(message)s"
    )
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
        connected = "connected" if vm.get("qmp_connected") else "not connected"
        print(f"  {vm['name']}: QMP {connected}, disks {', '.join(vm.get('disks', []))}")
    print(f"sessions ({len(status['sessions'])}):")
    for session in status["sessions"]:
        print(f"  {session['id']}: VM {session['vm']}, {session.get('state', '')}")


def _cmd_status(args: argparse.Namespace) -> int:
    status = control.call(args.control or default_control(), "status")
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
    else:
        _print_status(status)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "daemon": _cmd_daemon,
    "status": _cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NbdsrvError as e:
        print(f"nbdsrv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
