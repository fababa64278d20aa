"""A client command (status, backup begin, ...) starts fast: it imports none of the daemon's
modules, and of the standard library little beyond json, os and _socket; argparse only for a
line that is not written plainly (tests/unit/test_cli_parse.py)."""

import subprocess
import sys

import pytest

from nbdsrv.config.security import TLS_MODES
from nbdsrv.proto.server import TLSMode

# All of nbdsrv that a client command may import.
CLIENT_MODULES = {
    "nbdsrv",
    "nbdsrv.cli",
    "nbdsrv.config",
    "nbdsrv.config.paths",
    "nbdsrv.client_json",
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
    # json's Python half compiles regular expressions at import: a third of a client
    # command's start-up (nbdsrv/client_json.py uses the C half alone).
    "json",
)
# What json would have brought (argparse brings them too, when it is needed).
REGEX = ("re", "enum")

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


def modules_loaded(argv: list[str]) -> set[str]:
    """sys.modules after ``nbdsrv ARGV --control <nowhere>`` (which fails: no daemon there)."""
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
    return set(out.stdout.split())


def among(loaded: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in loaded for name in names if m == name or m.startswith(name + ".")}


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=" ".join)
def test_a_plain_client_command_imports_neither_the_daemon_nor_argparse(argv: list[str]) -> None:
    loaded = modules_loaded(argv)
    assert {m for m in loaded if m.split(".")[0] == "nbdsrv"} == CLIENT_MODULES
    assert among(loaded, (*HEAVY, *REGEX, "argparse", "shutil", "locale")) == set()


@pytest.mark.parametrize("argv", [["status", "--js"], ["backup", "begin", "vm", "--no-ch"]])
def test_a_client_command_parsed_by_argparse_imports_nothing_of_the_daemon(
    argv: list[str],
) -> None:
    loaded = modules_loaded(argv)
    assert "argparse" in loaded
    assert {m for m in loaded if m.split(".")[0] == "nbdsrv"} == CLIENT_MODULES
    assert among(loaded, HEAVY) == set()


def test_tls_modes_spelt_out_for_the_parser_are_the_servers() -> None:
    assert tuple(m.value for m in TLSMode) == TLS_MODES
