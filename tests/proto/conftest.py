"""Fixtures for the protocol tests: a sparse test image and a live in-process server."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.exports.export import Segment
from nbdsrv.exports.file import FileExport
from nbdsrv.net.server import NBDServer
from tests.harness.in_process import serving
from tests.harness.sparse_file import write_sparse

IMAGE_SIZE = 1 << 20
# (offset, length) of the data runs; the rest of the image is a hole.
DATA_RUNS = [(0, 65536), (524288, 65536), (1048576 - 4096, 4096)]


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, bytes]:
    """A sparse 1 MiB file and its contents."""
    path = tmp_path / "disk.img"
    return str(path), write_sparse(path, IMAGE_SIZE, DATA_RUNS, seed=20240601)


class GatedExport(FileExport):
    """A file export whose reads at ``gated`` offsets wait until ``gate`` is set."""

    def __init__(self, name: str, path: str, gated: set[int]) -> None:
        super().__init__(name, path)
        self.gate = asyncio.Event()
        self.gated = gated
        self.waiting = 0
        self.all_waiting = asyncio.Event()

    async def read(self, offset: int, length: int) -> list[Segment]:
        if offset in self.gated:
            self.waiting += 1
            if self.waiting == len(self.gated):
                self.all_waiting.set()
            await self.gate.wait()
        return await super().read(offset, length)

    def read_cached(self, offset: int, length: int) -> list[Segment] | None:
        # A gated read must wait in read(), not go out at once from the page cache.
        return None if offset in self.gated else super().read_cached(offset, length)


@dataclass
class ServedFile:
    """The in-process server exporting a sparse file as "disk"."""

    server: NBDServer
    catalog: ExportCatalog
    socket: str
    content: bytes
    path: str


@pytest.fixture
async def served(tmp_path: Path, image: tuple[str, bytes]) -> AsyncIterator[ServedFile]:
    """The real server on a unix socket, exporting the image as "disk"."""
    path, content = image
    catalog = ExportCatalog()
    catalog.add(FileExport("disk", path))
    socket = str(tmp_path / "nbd.sock")
    async with serving(catalog, socket) as (server, _):
        yield ServedFile(server, catalog, socket, content, path)
