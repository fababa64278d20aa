"""A client command (status, backup begin, ...) starts fast: it imports none of the daemon's
modules, and of the standard library little beyond argparse, json, os and _socket. It builds
only its own options, and the command line behaves as if it had built them all."""

import contextlib
import io
import subprocess
import sys

import pytest

from nbdsrv import cli
from nbdsrv.config.security import TLS_MODES
from nbdsrv.proto.server import TLSMode

# All of nbdsrv that a client command may import.
CLIENT_MODULES = {
    "nbdsrv",
    "nbdsrv.cli",
    "nbdsrv.config",
    "nbdsrv.config.paths",
    "nbdsrv.control_client",
    "nbdsrv.errors",
}
# Standard library and dependencies a client command must not import: each costs the start-up
# of every client command (typing, socket) or belongs to the daemon alone. pathlib and
# importlib.util are what setuptools' import-hook finder for editable installs loads from a
# .pth file (`make deps` installs the package as a plain path instead).
HEAVY = (
    "asyncio",
    "uvloop",
    "bitarray",
    "qemu",
    "ssl",
    "logging",
    "dataclasses",
    "typing",
    "socket",
    "pathlib",
    "importlib.util",
)

CLIENT_COMMANDS = [
    ["status"],
    ["checkpoint", "create", "vm", "--name", "c1"],
    ["checkpoint", "list", "vm"],
    ["checkpoint", "delete", "vm", "c1"],
    ["backup", "begin", "vm", "--no-checkpoint"],
    ["backup", "list", "vm"],
    ["backup", "end", "vm", "1"],
    ["snapshot", "create", "vm"],
    ["snapshot", "commit", "vm"],
]


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=" ".join)
def test_client_command_imports_nothing_of_the_daemon(argv: list[str]) -> None:
    # As the console script .venv/bin/nbdsrv runs it (`python -m` would add runpy's imports).
    code = (
        "import sys\n"
        "from nbdsrv.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print(' '.join(sorted(sys.modules)))\n"
    )
    control = "/nonexistent/control.sock"
    out = subprocess.run(
        [sys.executable, "-c", code, *argv, "--control", control],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert f"no daemon at {control}" in out.stderr
    loaded = set(out.stdout.split())
    assert {m for m in loaded if m.split(".")[0] == "nbdsrv"} == CLIENT_MODULES
    heavy = {m for m in loaded for h in HEAVY if m == h or m.startswith(h + ".")}
    assert heavy == set()


# Every help text and a sample of command lines, good and bad.
ARGVS = [
    [],
    ["-h"],
    ["--version"],
    ["bogus"],
    ["-1", "status"],
    ["--", "status"],
    ["daemon", "-h"],
    ["daemon", "--tls", "bogus"],
    ["serve", "-h"],
    ["serve"],
    ["status", "-h"],
    ["status", "--control"],
    ["status", "--cont", "/c", "--js"],
    ["status", "--bogus"],
    ["checkpoint"],
    ["checkpoint", "-h"],
    ["checkpoint", "create", "-h"],
    ["checkpoint", "create", "vm", "--granularity", "x"],
    ["checkpoint", "list", "-h"],
    ["checkpoint", "delete", "-h"],
    ["backup", "-h"],
    ["backup", "begin", "-h"],
    ["backup", "begin", "vm", "--checkpoint", "a", "--no-checkpoint"],
    ["backup", "begin", "vm", "--from", "c1", "--checkpoint", "c2", "--json"],
    ["backup", "list", "-h"],
    ["backup", "end", "-h"],
    ["backup", "end", "vm"],
    ["snapshot", "-h"],
    ["snapshot", "create", "-h"],
    ["snapshot", "commit", "-h"],
]


def _parse(build: bool, argv: list[str]) -> tuple[object, str, str]:
    """(namespace or exit code, stdout, stderr) of parsing argv with the parser main() builds
    (build=False) or with every command's options (build=True)."""
    parser = cli.build_parser() if build else cli.build_parser(cli._command_in(argv))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as e:
            result = e.code
    return result, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_a_command_parses_as_with_every_command_built(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert _parse(False, argv) == _parse(True, argv)


def test_tls_modes_spelt_out_for_the_parser_are_the_servers() -> None:
    assert tuple(m.value for m in TLSMode) == TLS_MODES
