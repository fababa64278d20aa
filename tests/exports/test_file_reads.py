"""FileExport reads: page-cache hits with RWF_NOWAIT, the rest in a worker thread, pooled
buffers, and holes searched only while the file has some — the data is always the file's."""

import os
import random
from pathlib import Path

import pytest

from nbdsrv.exports import file as file_module
from nbdsrv.exports.file import FileExport

KiB = 1024
DATA = random.Random(5).randbytes(1024 * KiB)


def joined(segments: list[tuple[int, int, object]]) -> bytes:
    return b"".join(bytes(n) if d is None else bytes(d) for _, n, d in segments)  # type: ignore[call-overload]


@pytest.fixture
def export(tmp_path: Path) -> FileExport:
    path = tmp_path / "disk.raw"
    path.write_bytes(DATA)
    return FileExport("disk", str(path))


@pytest.mark.parametrize("cached", [0, 1, None], ids=["none", "part", "unsupported"])
async def test_reads_not_in_the_cache_go_to_a_thread(
    export: FileExport, monkeypatch: pytest.MonkeyPatch, cached: int | None
) -> None:
    real = os.preadv
    calls = {"nowait": 0, "thread": 0}

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            calls["nowait"] += 1
            if cached is None:
                raise OSError(95, "not supported")
            if cached == 0:
                raise BlockingIOError(11, "would block")
            view = memoryview(buffers[0])[: len(buffers[0]) // 2]
            return real(fd, [view], offset)
        calls["thread"] += 1
        return real(fd, buffers, offset)

    monkeypatch.setattr(file_module.os, "preadv", preadv)
    for offset, length in [(0, 4096), (4096, 300 * KiB), (1000 * KiB, 24 * KiB), (7, 1)]:
        assert joined(await export.read(offset, length)) == DATA[offset : offset + length]
    assert calls["thread"] >= 4
    if cached is None:
        assert calls["nowait"] == 1  # then never again on this file
    export.close()


async def test_pooled_buffers_never_show_old_data(export: FileExport) -> None:
    first = await export.read(0, 64 * KiB)
    export.release(first)
    second = await export.read(64 * KiB, 64 * KiB)
    assert second[0][2] is first[0][2]  # the same buffer again
    assert joined(second) == DATA[64 * KiB : 128 * KiB]
    export.close()


async def test_holes_found_once_the_file_gets_some(
    export: FileExport, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [d is None for _, _, d in await export.read(0, 256 * KiB)] == [False]
    fd = os.open(export.path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, len(DATA))  # all hole now
        os.pwrite(fd, b"x" * 4096, 512 * KiB)
    finally:
        os.close(fd)
    monkeypatch.setattr(file_module, "HOLE_RECHECK", 0.0)
    segments = await export.read(0, 1024 * KiB)
    assert any(d is None for _, _, d in segments)
    assert joined(segments) == bytes(512 * KiB) + b"x" * 4096 + bytes(508 * KiB)
    export.close()
