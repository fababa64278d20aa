"""The asyncio NBD client against nbdsrv's own server (all header modes) and qemu-nbd."""

import asyncio
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.exports.file import FileExport
from nbdsrv.net.address import Address, parse_uri
from nbdsrv.net.client import NBDClient
from nbdsrv.proto.constants import BASE_ALLOCATION, Command, Errno, TransmissionFlag
from nbdsrv.proto.errors import ReplyError
from tests.harness.in_process import serving

MiB = 1024 * 1024
# Layout of the test file: data at [1 MiB, 1 MiB + 64 KiB) and [3 MiB, 4 MiB), holes elsewhere.
LAYOUT = [
    (0, MiB, 3),
    (MiB, 64 * 1024, 0),
    (MiB + 64 * 1024, 2 * MiB - 64 * 1024, 3),
    (3 * MiB, MiB, 0),
]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        os.pwrite(f.fileno(), b"\x11" * 64 * 1024, MiB)
        os.pwrite(f.fileno(), os.urandom(MiB), 3 * MiB)
    return path


@pytest.fixture
async def server(tmp_path: Path, image: Path) -> AsyncIterator[Address]:
    catalog = ExportCatalog()
    catalog.add(FileExport("disk", str(image)))
    async with serving(catalog, tmp_path / "nbd.sock") as (_, address):
        yield address


@pytest.mark.parametrize(
    ("structured", "extended"),
    [(False, False), (True, False), (True, True)],
    ids=["simple", "structured", "extended"],
)
async def test_client_reads_whole_file_in_every_header_mode(
    server: Address, image: Path, structured: bool, extended: bool
) -> None:
    client = await NBDClient.connect(server, "disk", structured=structured, extended=extended)
    assert (client.structured, client.extended) == (structured, extended)
    assert client.size == 4 * MiB
    assert client.flags & TransmissionFlag.CAN_MULTI_CONN
    chunks = await asyncio.gather(
        *(client.read(o, 256 * 1024) for o in range(0, 4 * MiB, 256 * 1024))
    )
    await client.close()
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(image.read_bytes()).digest()


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
async def test_client_block_status_matches_file_layout(server: Address, extended: bool) -> None:
    client = await NBDClient.connect(server, "disk", contexts=[BASE_ALLOCATION], extended=extended)
    status = await client.block_status(0, client.size)
    one = await client.block_status(MiB, client.size - MiB, req_one=True)
    await client.close()
    assert status == {BASE_ALLOCATION: [(length, flags) for _, length, flags in LAYOUT]}
    assert one == {BASE_ALLOCATION: [(64 * 1024, 0)]}


async def test_client_sees_error_replies_and_keeps_the_connection(server: Address) -> None:
    client = await NBDClient.connect(server, "disk")
    with pytest.raises(ReplyError) as excinfo:
        await client.read(4 * MiB - 512, 1024)
    assert excinfo.value.errno == Errno.EINVAL
    with pytest.raises(ReplyError) as excinfo:
        await client.request(Command.TRIM, 0, 0, 4096)
    assert excinfo.value.errno == Errno.EPERM
    assert len(await client.read(0, 512)) == 512
    await client.close()


async def test_client_lists_exports(server: Address) -> None:
    assert [name for name, _ in await NBDClient.list_exports(server)] == ["disk"]


async def test_client_unknown_export_is_refused(server: Address) -> None:
    with pytest.raises(ReplyError, match="not present"):
        await NBDClient.connect(server, "nope")


async def test_client_reads_from_qemu_nbd(tmp_path: Path, image: Path) -> None:
    from tests.harness.tools import require_tool

    require_tool("qemu-nbd")
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "raw", "-t", "-k", str(sock), "-x", "disk", str(image)]
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        address, export = parse_uri(f"nbd+unix:///disk?socket={sock}")
        client = await NBDClient.connect(address, export, contexts=[BASE_ALLOCATION])
        data = await client.read(3 * MiB, MiB)
        status = await client.block_status(0, client.size)
        await client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert data == image.read_bytes()[3 * MiB :]
    assert status[BASE_ALLOCATION][0] == (MiB, 3)
