"""File exports on plain connections: page-cached data goes out with sendfile, the rest
through the copying path, and both give the same bytes — with holes as holes, to a client
that stops reading for a while, and for a file evicted from the page cache.

The server's writer is real (a unix socket, the kernel's sendfile); the client is nbdsrv's
own, which checks that every READ reply covers its range exactly.
"""

import asyncio
import hashlib
import os
import random
from pathlib import Path

import pytest

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.exports.file import FileExport
from nbdsrv.exports.page_cache import PageCache
from nbdsrv.net.address import Address
from nbdsrv.net.client import NBDClient
from nbdsrv.net.server import NBDServer, ServerPolicy
from nbdsrv.proto.constants import Command
from tests.harness.in_process import start_server
from tests.harness.sparse_file import write_sparse
from tests.net.recorder import Recorder
from tests.net.slow_reader import read_after_a_pause

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
# Data regions of the sparse file; the rest is a hole.
DATA_RUNS = [
    (0, 1 * MiB),
    (3 * MiB, 64 * KiB),
    (5 * MiB + 4 * KiB, 2 * MiB),
    (SIZE - 4 * KiB, 4 * KiB),
]


@pytest.fixture
def sparse(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "sparse.img"
    return path, write_sparse(path, SIZE, DATA_RUNS, seed=7)


async def serve(tmp_path: Path, path: Path, zero_copy: bool) -> tuple[NBDServer, Address]:
    catalog = ExportCatalog()
    catalog.add(FileExport("disk", str(path)))
    return await start_server(
        catalog, tmp_path / f"nbd-{zero_copy}.sock", ServerPolicy(zero_copy=zero_copy)
    )


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "copy"])
async def test_sparse_file_reads_back_with_holes_as_holes(
    tmp_path: Path, sparse: tuple[Path, bytes], zero_copy: bool
) -> None:
    path, content = sparse
    server, address = await serve(tmp_path, path, zero_copy)
    client = await NBDClient.connect(address, "disk")
    await client.read(0, 4096)
    # Plain connections write their replies themselves (and so can sendfile), unless not.
    assert [c.output.writer is not None for c in server.connections] == [zero_copy]
    sink = Recorder(0, SIZE)
    client.submit(Command.READ, 0, 0, SIZE, sink)
    assert await sink.future is None
    assert bytes(sink.buffer) == content
    holes = [(o, n) for kind, o, n in sink.chunks if kind == "hole"]
    assert (1 * MiB, 2 * MiB) in holes  # the hole between the first two data runs
    # Odd ranges across data and holes.
    for offset, length in [(1 * MiB - 512, 1024), (3 * MiB + 60 * KiB, 8 * KiB), (SIZE - 1, 1)]:
        assert await client.read(offset, length) == content[offset : offset + length]
    await client.close()
    await server.stop()
    server.catalog.close_all()


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "copy"])
async def test_a_client_that_stops_reading_gets_every_byte_in_order(
    tmp_path: Path, zero_copy: bool
) -> None:
    """Far more reply data than the socket holds: the writer queues file ranges (partly
    sent) behind each other and sends them when the client reads again."""
    path = tmp_path / "random.img"
    content = random.Random(3).randbytes(SIZE)
    path.write_bytes(content)
    server, address = await serve(tmp_path, path, zero_copy)
    client = await NBDClient.connect(address, "disk")
    got = await read_after_a_pause(client, SIZE, 4)
    assert hashlib.sha256(got).digest() == hashlib.sha256(content * 4).digest()
    await client.close()
    await server.stop()
    server.catalog.close_all()


async def test_a_file_out_of_the_page_cache_is_read_through_the_copying_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cold.img"
    content = random.Random(5).randbytes(SIZE)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cache = PageCache()
        if cache.available:  # a kernel with cachestat (6.5 and later)
            assert cache.cached(fd, 0, SIZE) is False
    finally:
        os.close(fd)
    server, address = await serve(tmp_path, path, True)
    client = await NBDClient.connect(address, "disk")
    parts = await asyncio.gather(*(client.read(o, MiB) for o in range(0, SIZE, MiB)))
    assert b"".join(parts) == content
    await client.close()
    await server.stop()
    server.catalog.close_all()


def test_page_cache_says_cached_for_data_just_read(tmp_path: Path) -> None:
    path = tmp_path / "warm.img"
    path.write_bytes(random.Random(9).randbytes(MiB + 100))
    cache = PageCache()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, MiB + 100, 0)
        expected = True if cache.available else None
        assert cache.cached(fd, 0, MiB + 100) is expected
        assert cache.cached(fd, MiB, 100) is expected  # the partial last page
    finally:
        os.close(fd)
