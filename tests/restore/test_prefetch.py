"""A live restore's parallel prefetch (nbdsrv.restore.prefetch) racing a client: writes made
through ``restore/ID`` while the prefetch and block-stream copy from the source are never
overwritten with source data, and a source that goes away and comes back mid-prefetch still
gives an exact image. The source is nbdkit serving a raw file with its bandwidth limited,
so the copy lasts while the client writes. Checked by sha256."""

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdsrv.restore.sessions import BeginRestore
from tests.conftest import StartDaemon
from tests.harness.tools import require_tool
from tests.restore.conftest import Served, image_sha256, nbdsh, tool
from tests.restore.test_live import Source, file_sha256_of, wait_state
from tests.restore.test_live_disk import read_all

MiB = 1024 * 1024
SIZE = 32 * MiB
# The source's bandwidth in bits a second (nbdkit's rate filter): 2 MiB/s, a copy of ~16 s.
SOURCE_RATE = "16M"


class SlowSource(Source):
    """nbdkit serving ``image`` (raw) read-only on ``socket``, at SOURCE_RATE."""

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def argv(self) -> list[str]:
        return [
            *(require_tool("nbdkit"), "--foreground", "--readonly", "--exit-with-parent"),
            *("--filter=rate", "-U", str(self.socket)),
            *("file", str(self.image), f"rate={SOURCE_RATE}"),
        ]


@pytest.fixture
async def slow_source(tmp_path: Path, short_dir: Path) -> AsyncIterator[tuple[SlowSource, bytes]]:
    data = bytearray(random.Random(11).randbytes(SIZE))
    data[8 * MiB : 10 * MiB] = bytes(2 * MiB)  # zeroes in the source are copied too
    raw = tmp_path / "backup.raw"
    raw.write_bytes(data)
    source = SlowSource(raw, short_dir / "slow.sock")
    await source.start()
    yield source, bytes(data)
    source.kill()


def patterns(seed: int, count: int) -> list[tuple[int, int, int]]:
    """``(offset, length, byte)`` of writes all over the image, unaligned to clusters and
    to the prefetch's chunks, some across a chunk's edge."""
    rng = random.Random(seed)
    writes = []
    for i in range(count):
        offset = rng.randrange(0, SIZE - 300 * 1024) // 512 * 512
        if i % 4 == 0:  # across the edge of a 1 MiB chunk
            offset = rng.randrange(1, SIZE // MiB) * MiB - 3 * 512
        writes.append((offset, rng.randrange(1, 600) * 512, 1 + i % 255))
    return writes


def write_script(writes: list[tuple[int, int, int]]) -> str:
    lines = [f"h.pwrite(bytes([{byte}]) * {length}, {offset})" for offset, length, byte in writes]
    return "\n".join([*lines, "h.flush()"])


def applied(data: bytes, writes: list[tuple[int, int, int]]) -> bytes:
    expected = bytearray(data)
    for offset, length, byte in writes:
        expected[offset : offset + length] = bytes([byte]) * length
    return bytes(expected)


async def test_writes_during_the_prefetch_are_never_lost(
    restore: Served, slow_source: tuple[SlowSource, bytes], tmp_path: Path
) -> None:
    source, data = slow_source
    image = tmp_path / "restored.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), source=source.uri))
    assert restore.sessions.sessions[began["id"]].prefetch is not None
    uri = restore.uri(began["export"])
    [before] = restore.sessions.list()
    assert before["state"] == "streaming" and before["streamed_bytes"] < SIZE, before
    # Partial clusters make QEMU read the rest of each from the source: the writes take as
    # long as the copy, in the middle of the prefetch's requests.
    writes = patterns(5, 60)
    await nbdsh(uri, write_script(writes))
    done = await wait_state(restore, began["id"], "ready", "failed", timeout=120)
    assert done["state"] == "ready" and done["streamed_bytes"] == SIZE, done
    await restore.sessions.end(began["id"])
    assert await image_sha256(image) == file_sha256_of(applied(data, writes), tmp_path)


async def test_source_lost_mid_prefetch_then_back(
    restore: Served, slow_source: tuple[SlowSource, bytes], tmp_path: Path
) -> None:
    source, data = slow_source
    image = tmp_path / "restored.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), source=source.uri))
    uri = restore.uri(began["export"])
    await asyncio.sleep(1)  # the prefetch is under way
    seen = [restore.sessions.list()[0]["streamed_bytes"]]
    source.kill()
    lost = await wait_state(restore, began["id"], "source unreachable", "failed", "ready")
    assert lost["state"] == "source unreachable", lost
    seen.append(lost["streamed_bytes"])
    # Whole clusters (64 KiB) need nothing from the source: written while it is away.
    writes = [(offset, 128 * 1024, 0x5A) for offset in range(MiB, SIZE, 3 * MiB)]
    await nbdsh(uri, write_script(writes))
    await source.start()
    for _ in range(1200):
        [info] = restore.sessions.list()
        seen.append(info["streamed_bytes"])
        if info["state"] in ("ready", "failed"):
            break
        await asyncio.sleep(0.1)
    assert info["state"] == "ready", info
    assert seen == sorted(seen) and seen[-1] == SIZE, seen  # monotonic, complete at ready
    await restore.sessions.end(began["id"])
    assert await image_sha256(image) == file_sha256_of(applied(data, writes), tmp_path)


async def test_abort_mid_prefetch_leaves_nothing_of_ours(
    restore: Served, slow_source: tuple[SlowSource, bytes], tmp_path: Path
) -> None:
    source, _ = slow_source
    image = tmp_path / "partial.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), source=source.uri))
    assert restore.sessions.sessions[began["id"]].prefetch is not None
    await asyncio.sleep(1)  # the prefetch is under way
    ended = await restore.sessions.end(began["id"], abort=True)
    assert ended["state"] == "streaming" and restore.sessions.list() == []
    # No QEMU of nbdsrv's holds the image: another one may open it read-write.
    info = json.loads(await tool("qemu-img", "info", "--output=json", str(image)))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    await tool("qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(image))


async def test_writes_during_the_prefetch_into_a_disk_are_never_lost(
    nbdsrv_daemons: StartDaemon,
    short_dir: Path,
    tmp_path: Path,
    slow_source: tuple[SlowSource, bytes],
) -> None:
    """``VM --disk DISK --source``: the stream into the overlay has the prefetch too; writes
    racing it land, and the disk ends as the source with the writes."""
    source, data = slow_source
    disk = tmp_path / "disk.qcow2"
    await tool("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    daemon = nbdsrv_daemons("--listen", f"unix:{short_dir / 'nbd.sock'}", "--image", f"vm1={disk}")
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", source.uri)
    assert began["state"] == "streaming", began
    # The prefetch's own export sits beside the restore's on the QSD that holds the disk.
    qsd = f"nbd+unix:///?socket={daemon.state_dir}/vm1.live.sock"
    listed = json.loads(await tool("nbdinfo", "--list", "--json", qsd))
    assert f"rs-{began['id']}-pf" in [e["export-name"] for e in listed["exports"]], listed
    writes = patterns(7, 40)
    # Each write's partial clusters are read from the slow source first: the writes take
    # seconds, and the copy from the source goes on while they are made.
    writing = asyncio.create_task(nbdsh(began["uri"], write_script(writes)))
    await asyncio.sleep(0.5)
    [during] = daemon.json("restore", "list")
    assert during["state"] == "streaming" and during["step"] == "stream", during
    await writing
    for _ in range(1200):
        [info] = daemon.json("restore", "list")
        if info["state"] in ("ready", "failed"):
            break
        await asyncio.sleep(0.1)
    assert info["state"] == "ready" and info["streamed_bytes"] == SIZE, info
    daemon.json("restore", "end", began["id"])
    live = f"nbd+unix:///disk0?socket={daemon.state_dir}/vm1.live.sock"
    assert read_all(live, tmp_path / "now.raw") == applied(data, writes)
    assert "no prefetch" not in daemon.log_path.read_text()
