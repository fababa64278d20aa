"""A client command (status, backup begin, ...) imports none of the daemon's modules: the
command line is built from the operation table, the daemon's machinery loads only in
`nbdsrv daemon` (cli._cmd_daemon)."""

import subprocess
import sys

import pytest

from nbdsrv.config.security import TLS_MODES
from nbdsrv.operations import OPERATIONS
from nbdsrv.proto.server import TLSMode

# All of nbdsrv that a client command may import.
CLIENT_MODULES = {
    "nbdsrv",
    "nbdsrv.cli",
    "nbdsrv.client",  # the client library (its asyncio half loads only when asked for)
    "nbdsrv.client.endpoint",
    "nbdsrv.client.operations",
    "nbdsrv.client.sync",
    "nbdsrv.client.wire",
    "nbdsrv.config",
    "nbdsrv.config.paths",
    "nbdsrv.errors",
    "nbdsrv.operations",
    "nbdsrv.text_output",
}
# What belongs to the daemon alone.
DAEMON_ONLY = ("asyncio", "uvloop", "bitarray", "qemu", "ssl", "logging", "libvirt")


def modules_loaded(argv: list[str]) -> set[str]:
    """sys.modules after ``nbdsrv ARGV --control <nowhere>`` (which fails: no daemon there)."""
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


def positionals(op_index: int) -> list[str]:
    op = OPERATIONS[op_index]
    return [*op.words, *("vm" for arg in op.args if arg.positional and arg.required)]


@pytest.mark.parametrize("index", range(len(OPERATIONS)), ids=[op.name for op in OPERATIONS])
def test_a_client_command_imports_nothing_of_the_daemon(index: int) -> None:
    loaded = modules_loaded(positionals(index))
    assert {m for m in loaded if m.split(".")[0] == "nbdsrv"} == CLIENT_MODULES
    assert among(loaded, DAEMON_ONLY) == set()


def test_tls_modes_spelt_out_for_the_parser_are_the_servers() -> None:
    assert tuple(m.value for m in TLSMode) == TLS_MODES
