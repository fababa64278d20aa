"""Live restore from a real NBD source (qemu-nbd serving a qcow2 backup read-only): the
export reads as the source at once, writes stay local, the copy completes and the image
stands alone; with the source killed mid-copy, uncopied blocks fail with EIO, written ones
stay readable, and the copy resumes when the source returns. Checked by sha256."""

import asyncio
import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.restore.sessions import BeginRestore
from tests.harness.tools import require_tool
from tests.restore.conftest import Served, file_sha256, image_sha256, nbdsh, tool

MiB = 1024 * 1024
SIZE = 32 * MiB
LOCAL = (4 * MiB, MiB)  # a range the test writes through the export while it streams


class Source:
    """qemu-nbd serving ``image`` read-only on ``socket`` as export ``backup``."""

    def __init__(self, image: Path, socket: Path) -> None:
        self.image = image
        self.socket = socket
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///backup?socket={self.socket}"

    def argv(self) -> list[str]:
        return [
            *(require_tool("qemu-nbd"), "-r", "-t", "-x", "backup"),
            *("-k", str(self.socket), "-f", "qcow2", str(self.image)),
        ]

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(200):
            if self.socket.exists():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.argv()[0]} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.socket.unlink(missing_ok=True)


@pytest.fixture
async def backup(tmp_path: Path, short_dir: Path) -> Iterator[tuple[Source, bytes]]:
    data = bytearray(random.Random(9).randbytes(SIZE))
    data[16 * MiB : 20 * MiB] = bytes(4 * MiB)
    raw = tmp_path / "backup.raw"
    raw.write_bytes(data)
    qcow2 = tmp_path / "backup.qcow2"
    await tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    source = Source(qcow2, short_dir / "src.sock")
    await source.start()
    yield source, bytes(data)
    source.kill()


async def wait_state(restore: Served, session_id: str, *states: str, timeout: float = 60) -> Any:
    for _ in range(int(timeout / 0.1)):
        [info] = [s for s in restore.sessions.list() if s["id"] == session_id]
        if info["state"] in states:
            return info
        await asyncio.sleep(0.1)
    raise AssertionError(f"restore {session_id} still {info['state']}, not {states}")


WRITE_LOCAL = f"""
h.pwrite(b"\\x77" * {LOCAL[1]}, {LOCAL[0]})
h.flush()
"""


async def test_reads_the_source_at_once_then_stands_alone(
    restore: Served, backup: tuple[Source, bytes], tmp_path: Path
) -> None:
    source, data = backup
    image = tmp_path / "restored.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), source=source.uri))
    assert began["state"] == "streaming" and began["size"] == SIZE
    assert began["source"] == source.uri and began["format"] == "qcow2"
    uri = restore.uri(began["export"])
    # The export reads as the source at once, and takes writes.
    copy = tmp_path / "read.raw"
    await tool("nbdcopy", uri, str(copy))
    assert file_sha256(copy) == file_sha256_of(data, tmp_path)
    await nbdsh(uri, WRITE_LOCAL)
    ready = await wait_state(restore, began["id"], "ready", "failed")
    assert ready["state"] == "ready" and ready["streamed_bytes"] == SIZE
    source.kill()  # no longer needed
    expected = bytearray(data)
    expected[LOCAL[0] : LOCAL[0] + LOCAL[1]] = b"\x77" * LOCAL[1]
    await tool("nbdcopy", uri, str(copy))
    assert file_sha256(copy) == file_sha256_of(bytes(expected), tmp_path)
    await restore.sessions.end(began["id"])
    info = json.loads(await tool("qemu-img", "info", "--output=json", str(image)))
    assert "backing-filename" not in info
    assert await image_sha256(image) == file_sha256_of(bytes(expected), tmp_path)


def file_sha256_of(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "expected.raw"
    path.write_bytes(data)
    return file_sha256(path)


READ_BOTH = f"""
import nbd
try:
    h.pread(65536, {SIZE - 65536})
    print("tail read")
except nbd.Error as e:
    print("tail errno", e.errnum)
assert h.pread(65536, {LOCAL[0]}) == b"\\x77" * 65536
print("local ok")
"""


async def test_source_lost_mid_copy_then_back(
    short_dir: Path, backup: tuple[Source, bytes], tmp_path: Path
) -> None:
    from tests.restore.conftest import serve, stop

    source, data = backup
    restore = await serve(short_dir, "slow")
    restore.sessions.stream_speed = 2 * MiB  # the copy takes ~16 s: time to pull the plug
    try:
        image = tmp_path / "restored.qcow2"
        began = await restore.sessions.begin(BeginRestore(image=str(image), source=source.uri))
        uri = restore.uri(began["export"])
        await nbdsh(uri, WRITE_LOCAL)
        source.kill()
        lost = await wait_state(restore, began["id"], "source unreachable", "failed")
        assert lost["state"] == "source unreachable", lost
        assert lost["streamed_bytes"] < SIZE
        out = await nbdsh(uri, READ_BOTH)
        assert "tail errno 5" in out and "local ok" in out, out
        await source.start()
        await wait_state(restore, began["id"], "streaming", "ready")
        done = await wait_state(restore, began["id"], "ready", "failed", timeout=120)
        assert done["state"] == "ready", done
        await restore.sessions.end(began["id"])
        expected = bytearray(data)
        expected[LOCAL[0] : LOCAL[0] + LOCAL[1]] = b"\x77" * LOCAL[1]
        assert await image_sha256(image) == file_sha256_of(bytes(expected), tmp_path)
    finally:
        await stop(restore)


async def test_end_while_streaming_needs_abort(
    short_dir: Path, backup: tuple[Source, bytes], tmp_path: Path
) -> None:
    from nbdsrv.errors import NbdsrvError
    from tests.restore.conftest import serve, stop

    source, _ = backup
    restore = await serve(short_dir, "abort")
    restore.sessions.stream_speed = MiB
    try:
        image = tmp_path / "partial.qcow2"
        began = await restore.sessions.begin(BeginRestore(image=str(image), source=source.uri))
        with pytest.raises(NbdsrvError, match="--abort"):
            await restore.sessions.end(began["id"])
        assert restore.sessions.list()[0]["state"] == "streaming"
        ended = await restore.sessions.end(began["id"], abort=True)
        assert ended["state"] == "streaming"
        assert restore.sessions.list() == []
        # What an aborted live restore leaves: a qcow2 with no backing link (docs/restore.md).
        info = json.loads(await tool("qemu-img", "info", "--output=json", str(image)))
        assert info["format"] == "qcow2" and "backing-filename" not in info
    finally:
        await stop(restore)
