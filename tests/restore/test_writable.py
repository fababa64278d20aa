"""restore begin --image: a writable restore/ID export into an image, written by real
clients (nbdcopy, qemu-img convert -n, nbdsh), checked by the sha256 of the image after end."""

import json
import random
from pathlib import Path

from nbdsrv.restore.sessions import BeginRestore
from tests.restore.conftest import Served, file_sha256, image_sha256, nbdsh, tool

MiB = 1024 * 1024
SIZE = 8 * MiB


def payload(path: Path, seed: int = 1) -> Path:
    """Random data with a zero run in the middle (nbdcopy sends it as a zeroing)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(SIZE))
    data[2 * MiB : 5 * MiB] = bytes(3 * MiB)
    path.write_bytes(data)
    return path


async def test_nbdcopy_into_a_new_qcow2(restore: Served, tmp_path: Path) -> None:
    source = payload(tmp_path / "backup.raw")
    image = tmp_path / "restored.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=SIZE))
    assert began["state"] == "writable" and began["format"] == "qcow2"
    assert began["export"] == f"restore/{began['id']}" and began["size"] == SIZE
    await tool("nbdcopy", str(source), restore.uri(began["export"]))
    [listed] = restore.sessions.list()
    assert listed["written_bytes"] >= SIZE - 3 * MiB
    ended = await restore.sessions.end(began["id"])
    assert ended["id"] == began["id"]
    assert restore.sessions.list() == []
    assert await image_sha256(image) == file_sha256(source)


async def test_qemu_img_convert_into_an_existing_raw(restore: Served, tmp_path: Path) -> None:
    source = payload(tmp_path / "backup.raw", seed=2)
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xee" * SIZE)  # old content, all of it overwritten
    began = await restore.sessions.begin(BeginRestore(image=str(image)))
    assert began["format"] == "raw" and began["size"] == SIZE
    uri = restore.uri(began["export"])
    await tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri)
    await restore.sessions.end(began["id"])
    assert file_sha256(image) == file_sha256(source)


async def test_export_flags_writable_and_multi_conn(restore: Served, tmp_path: Path) -> None:
    began = await restore.sessions.begin(BeginRestore(image=str(tmp_path / "t.qcow2"), size=SIZE))
    info = json.loads(await tool("nbdinfo", "--json", restore.uri(began["export"])))
    [export] = info["exports"]
    assert export["is_read_only"] is False
    assert export["can_multi_conn"] is True
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"):
        assert export[can] is True, can
    await restore.sessions.end(began["id"])


NBDSH_SCRIPT = """
import nbd
M = 1024 * 1024
h.pwrite(b"\\x11" * M, 0)
h.pwrite(b"\\x22" * M, M, nbd.CMD_FLAG_FUA)
h.pwrite(b"\\x33" * (3 * M), 2 * M)
h.zero(M // 2, 2 * M + 4096)
h.zero(M, 3 * M, nbd.CMD_FLAG_NO_HOLE)
h.trim(M, 4 * M)
h.flush()
h.cache(8 * M, 0)
try:
    h.zero(M, 5 * M, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == 95, e  # ENOTSUP: QEMU cannot zero that fast; nothing changed
assert h.pread(M // 2, 0) == b"\\x11" * (M // 2)
assert h.pread(4096, 2 * M + 4096) == bytes(4096)
seen = []
h.block_status(8 * M, 0, lambda ctx, off, ent, err: seen.append(ctx) or 0)
assert seen == ["base:allocation"], seen
print("ok")
"""


async def test_nbdsh_writes_zeroes_trims_flushes(restore: Served, tmp_path: Path) -> None:
    image = tmp_path / "t.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=SIZE))
    out = await nbdsh(restore.uri(began["export"]), NBDSH_SCRIPT, contexts=["base:allocation"])
    assert out.strip() == "ok"
    await restore.sessions.end(began["id"])
    expected = bytearray(SIZE)
    expected[0:MiB] = b"\x11" * MiB
    expected[MiB : 2 * MiB] = b"\x22" * MiB
    expected[2 * MiB : 5 * MiB] = b"\x33" * (3 * MiB)
    expected[2 * MiB + 4096 : 2 * MiB + 4096 + MiB // 2] = bytes(MiB // 2)
    expected[3 * MiB : 4 * MiB] = bytes(MiB)
    expected[4 * MiB : 5 * MiB] = bytes(MiB)  # trimmed: discard=unmap, reads as zeroes
    check = tmp_path / "expected.raw"
    check.write_bytes(expected)
    assert await image_sha256(image) == file_sha256(check)
