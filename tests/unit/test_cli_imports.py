"""A client command (status, backup begin, ...) starts fast: it imports neither the daemon nor
asyncio, only the standard library's argparse, json, os and socket."""

import subprocess
import sys

from nbdsrv.config.security import TLS_MODES
from nbdsrv.proto.server import TLSMode

HEAVY = ("asyncio", "uvloop", "bitarray", "qemu", "ssl", "nbdsrv.daemon", "nbdsrv.net.server")


def test_client_commands_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from nbdsrv import cli\n"
        "try:\n"
        "    cli.main(['status', '--control', '/nonexistent/control.sock'])\n"
        "finally:\n"
        "    print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert "no daemon at /nonexistent/control.sock" in out.stderr
    loaded = out.stdout.split()
    assert "nbdsrv.cli" in loaded
    assert [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY] == []


def test_tls_modes_spelt_out_for_the_parser_are_the_servers() -> None:
    assert tuple(m.value for m in TLSMode) == TLS_MODES
