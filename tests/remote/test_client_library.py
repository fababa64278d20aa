"""nbdsrv.client: one method per operation of the table in both clients; the asyncio client
against a remote daemon; the CLI's --connect, $NBDSRV_CONNECT and what it loads."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys

import pytest

from nbdsrv.client import AsyncClient, Client, ControlError
from nbdsrv.operations import OPERATIONS, Operation
from tests.harness.daemon import nbdsrv_argv
from tests.harness.tools import run, run_result

from .fleet import FleetCerts, Host


def parameters(method: object) -> list[str]:
    return [
        "from" if name == "from_" else name
        for name in inspect.signature(method).parameters  # type: ignore[arg-type]
        if name != "self"
    ]


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_every_operation_has_a_method_with_its_arguments(op: Operation) -> None:
    for client in (Client, AsyncClient):
        method = getattr(client, op.handler, None)
        assert method is not None, f"{client.__name__} has no {op.handler}()"
        assert parameters(method) == [arg.name for arg in op.args], (client, op.name)
        assert inspect.iscoroutinefunction(method) == (client is AsyncClient)


def test_the_asyncio_client_drives_a_remote_daemon(host: Host, fleet_certs: FleetCerts) -> None:
    async def main() -> None:
        async with AsyncClient(host.connect, str(fleet_certs.backup)) as daemon:
            hello, status = await asyncio.gather(daemon.hello(), daemon.status())
            assert hello["protocol"] == 1 and "backup-begin" in hello["operations"]
            assert [vm["name"] for vm in status["vms"]] == ["web"]
            created = await daemon.checkpoint_create("web", name="c1")
            session = await daemon.backup_begin("web", from_="c1", no_checkpoint=True)
            assert session["from"] == "c1" and created["name"] == "c1"
            assert session["disks"]["disk0"]["contexts"] == [
                "base:allocation",
                "qemu:dirty-bitmap:c1",
            ]
            await daemon.backup_end("web", session["id"])
            with pytest.raises(ControlError) as raised:
                await daemon.checkpoint_list("secret")
            assert raised.value.code == "not-found"

    asyncio.run(main())


def test_connect_before_or_after_the_command_and_from_the_environment(
    host: Host, fleet_certs: FleetCerts
) -> None:
    certs = str(fleet_certs.backup)
    for argv in (
        ["--connect", host.connect, "--tls-certificates", certs, "status", "--json"],
        ["status", "--json", "--connect", host.connect, "--tls-certificates", certs],
    ):
        assert [vm["name"] for vm in json.loads(run(nbdsrv_argv(*argv)))["vms"]] == ["web"]
    # $NBDSRV_CONNECT wins over $NBDSRV_CONTROL (which names the local socket here).
    env = {
        **os.environ,
        "NBDSRV_CONNECT": host.connect,
        "NBDSRV_TLS_CERTIFICATES": certs,
        "NBDSRV_CONTROL": host.daemon.control,
    }
    status = json.loads(run(nbdsrv_argv("status", "--json"), env=env))
    assert [vm["name"] for vm in status["vms"]] == ["web"]
    # ... and --control on the command line wins over both.
    status = json.loads(
        run(nbdsrv_argv("status", "--json", "--control", host.daemon.control), env=env)
    )
    assert {vm["name"] for vm in status["vms"]} == {"web", "secret"}
    both = run_result(
        nbdsrv_argv("status", "--connect", host.connect, "--control", host.daemon.control),
        timeout=60,
    )
    assert (both.returncode, both.stderr) == (
        1,
        "nbdsrv: error: --connect and --control exclude each other\n",
    )
    missing = run_result(nbdsrv_argv("status", "--connect", host.connect), timeout=60)
    assert missing.returncode == 1 and missing.stderr == (
        f"nbdsrv: error: {host.connect} needs --tls-certificates DIR (with ca-cert.pem, "
        "client-cert.pem, client-key.pem)\n"
    )


def test_a_remote_command_loads_ssl_but_not_asyncio(host: Host, fleet_certs: FleetCerts) -> None:
    code = (
        "import sys\n"
        "from nbdsrv.cli import main\n"
        "main(sys.argv[1:])\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    argv = [
        "status",
        "--json",
        "--connect",
        host.connect,
        "--tls-certificates",
        str(fleet_certs.backup),
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(out.stderr.split())
    assert "ssl" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("asyncio", "uvloop")}
    assert not {m for m in loaded if m.startswith("nbdsrv.remote") or m == "nbdsrv.daemon"}
