"""Restore exports under the daemon's rules: --allow matches them as restore/*, every other
export stays read-only beside them, a live restore reads an nbds:// source with the daemon's
TLS files, and writes still land when a connection has no upstream link of its own."""

import asyncio
import random
import socket
import subprocess
from pathlib import Path

import pytest

from nbdsrv.exports.file import FileExport
from nbdsrv.exports.restore import RestoreExport
from nbdsrv.net.access import AccessPolicy, parse_allow
from nbdsrv.net.server import ServerPolicy
from nbdsrv.restore.sessions import BeginRestore, RestoreSessions
from nbdsrv.restore.source import TLSFiles
from tests.harness.tools import require_tool, stop_process
from tests.restore.conftest import Served, file_sha256, image_sha256, nbdsh, serve, stop, tool
from tests.security.certs import Certs

MiB = 1024 * 1024


async def test_allow_rules_match_restore_exports(short_dir: Path, tmp_path: Path) -> None:
    served = await serve(short_dir, "allow")
    served.server.policy = ServerPolicy(
        access=AccessPolicy([parse_allow("restore/*=cidr:10.0.0.0/8")])
    )
    try:
        began = await served.sessions.begin(BeginRestore(image=str(tmp_path / "t.qcow2"), size=MiB))
        out = await tool("nbdinfo", served.uri(began["export"]), check=False)
        assert "restore" not in out
        listed = await tool("nbdinfo", "--list", served.uri(""), check=False)
        assert began["export"] not in listed
        await served.sessions.end(began["id"])
    finally:
        await stop(served)


async def test_other_exports_stay_read_only(restore: Served, tmp_path: Path) -> None:
    plain = tmp_path / "plain.raw"
    plain.write_bytes(b"\x01" * MiB)
    restore.server.catalog.add(FileExport("plain", str(plain)))
    began = await restore.sessions.begin(BeginRestore(image=str(tmp_path / "t.qcow2"), size=MiB))
    script = """
import nbd
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    print("errno", e.errnum)
"""
    assert (await nbdsh(restore.uri("plain"), script)).strip() == "errno 1"
    assert plain.read_bytes() == b"\x01" * MiB
    await restore.sessions.end(began["id"])


async def test_writes_without_an_upstream_link_of_their_own(
    restore: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(self: RestoreExport) -> None:
        raise OSError(5, "no link for this test")

    monkeypatch.setattr(RestoreExport, "open_upstream", refused)
    data = tmp_path / "data.raw"
    data.write_bytes(random.Random(4).randbytes(4 * MiB))
    image = tmp_path / "t.raw"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=4 * MiB, format="raw"))
    uri = restore.uri(began["export"])
    await tool("nbdcopy", str(data), uri)
    await nbdsh(uri, "h.zero(65536, 0); h.trim(65536, 65536); h.flush(); h.cache(4096, 0)")
    await restore.sessions.end(began["id"])
    expected = bytearray(data.read_bytes())
    expected[0:131072] = bytes(131072)
    check = tmp_path / "expected.raw"
    check.write_bytes(expected)
    assert file_sha256(image) == file_sha256(check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_live_restore_from_an_nbds_source(
    short_dir: Path, tmp_path: Path, certs: Certs
) -> None:
    data = tmp_path / "backup.raw"
    data.write_bytes(random.Random(6).randbytes(8 * MiB))
    port = free_port()
    server = certs.server
    source = subprocess.Popen(
        [
            *(require_tool("qemu-nbd"), "-r", "-t", "-f", "raw", "-x", "backup"),
            *("-b", "127.0.0.1", "-p", str(port), "--tls-creds", "tls0"),
            "--object",
            f"tls-creds-x509,id=tls0,dir={server},endpoint=server,verify-peer=off",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    served = await serve(short_dir, "tls")
    served.sessions = RestoreSessions(
        served.server.catalog,
        served.server.addresses,
        served.state_dir,
        tls_files=TLSFiles(
            str(server / "server-cert.pem"),
            str(server / "server-key.pem"),
            str(server / "ca-cert.pem"),
        ),
    )
    try:
        for _ in range(200):  # until qemu-nbd listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.05)
        image = tmp_path / "restored.qcow2"
        uri = f"nbds://127.0.0.1:{port}/backup"
        began = await served.sessions.begin(BeginRestore(image=str(image), source=uri))
        for _ in range(600):
            state = served.sessions.list()[0]["state"]
            if state in ("ready", "failed"):
                break
            await asyncio.sleep(0.1)
        assert state == "ready", served.sessions.list()
        await served.sessions.end(began["id"])
        assert await image_sha256(image) == file_sha256(data)
    finally:
        await stop(served)
        stop_process(source)
