"""WRITEs through restore/ID on a plain connection: payloads spliced from the client's socket
to QEMU's (nbdsrv/net/write_intake.py). Real QSD, real nbdcopy / nbdsh, content checked by
sha256 of the image; a client or a QEMU that goes away in the middle of a payload; TLS
connections keep the general path."""

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.net import write_intake
from nbdsrv.net.address import Address
from nbdsrv.net.client import NBDClient
from nbdsrv.net.server import NBDServer, ServerPolicy
from nbdsrv.net.tls import server_context
from nbdsrv.proto.server import TLSMode
from nbdsrv.restore.sessions import BeginRestore, RestoreSessions
from tests.proto import spec
from tests.proto.rawclient import RawClient
from tests.restore.conftest import Served, file_sha256, image_sha256, nbdsh, stop, tool
from tests.security.certs import Certs

MiB = 1024 * 1024


@pytest.fixture
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """uvloop, as the daemon runs (TLS served in-process needs it: under asyncio's own loop
    the client's TLS hello reaches the protocol core)."""
    return uvloop.EventLoopPolicy()


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every WRITE whose payload the intake moved (a spy: the real method
    runs)."""
    lengths: list[int] = []
    start = write_intake.WriteIntake._start

    def counted(self: write_intake.WriteIntake, request: write_intake.Request) -> None:
        lengths.append(request.length)
        start(self, request)

    monkeypatch.setattr(write_intake.WriteIntake, "_start", counted)
    return lengths


async def test_nbdcopy_random_data_lands_exactly(
    restore: Served, tmp_path: Path, spliced: list[int]
) -> None:
    size = 96 * MiB + 25 * 512  # not a multiple of the request size: a short last WRITE
    source = tmp_path / "random.raw"
    source.write_bytes(random.Random(11).randbytes(size))
    image = tmp_path / "restored.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=size))
    await tool("nbdcopy", str(source), restore.uri(began["export"]))
    [listed] = restore.sessions.list()
    assert listed["written_bytes"] == size
    await restore.sessions.end(began["id"])
    assert await image_sha256(image) == file_sha256(source)
    assert sum(spliced) > size // 2  # the first WRITE of each connection opens its link


# Batches of requests in flight on one connection, each on a slot of its own (requests in
# flight are not ordered), odd offsets and lengths: writes (some FUA, some longer than the
# relay's pipe), zeroes, trims of whole slots, reads checked against the model, flushes.
# Then a WRITE past the end (its payload must be read and thrown away) and more requests.
MIXED = """
import nbd, random
rng = random.Random(5)
size = h.get_size()
S = 2 * 1024 * 1024
model = bytearray(size)
for batch in range(30):
    reads, keep = [], []
    for slot in rng.sample(range(size // S), 10):
        base = slot * S
        op = rng.choice(["write", "write", "write", "big", "zero", "trim", "read"])
        off = base + rng.randrange(0, S // 2)
        n = rng.randrange(1, base + S - off)
        if op == "big":
            off, n = base + rng.randrange(0, 4096), S - 4096
        if op in ("write", "big"):
            data = bytearray(rng.randbytes(n))
            buf = nbd.Buffer.from_bytearray(data)
            keep.append(buf)
            h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
            model[off:off + n] = data
        elif op == "zero":
            h.aio_zero(n, off)
            model[off:off + n] = bytes(n)
        elif op == "trim":
            h.aio_trim(S, base)
            model[base:base + S] = bytes(S)
        else:
            buf = nbd.Buffer(n)
            h.aio_pread(buf, off)
            reads.append((buf, off, n))
    if batch % 4 == 0:
        h.aio_flush()
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for buf, off, n in reads:
        assert buf.to_bytearray() == model[off:off + n], (off, n)
h.set_strict_mode(0)
try:
    h.pwrite(b"\\x55" * 70000, size - 1000)
    raise AssertionError("a WRITE past the end succeeded")
except nbd.Error as e:
    assert e.errnum == 22, e  # EINVAL
h.pwrite(b"\\x66" * 5, 3)
model[3:8] = b"\\x66" * 5
assert h.pread(20, 0) == model[:20]
h.flush()
open(OUT, "wb").write(model)
print("ok")
"""


async def test_mixed_requests_on_one_connection(
    restore: Served, tmp_path: Path, spliced: list[int]
) -> None:
    size = 40 * MiB
    image = tmp_path / "t.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=size))
    expected = tmp_path / "expected.raw"
    script = f"OUT = {str(expected)!r}\n" + MIXED
    out = await nbdsh(restore.uri(began["export"]), script)
    assert out.strip() == "ok"
    await restore.sessions.end(began["id"])
    assert await image_sha256(image) == file_sha256(expected)
    assert 5 in spliced and any(n > 1 * MiB for n in spliced)


async def test_extended_headers(restore: Served, tmp_path: Path, spliced: list[int]) -> None:
    """A client with 64-bit headers (nbdsrv's NBDClient): WRITEs with PAYLOAD_LEN, one FUA;
    QEMU's link has compact headers."""
    began = await restore.sessions.begin(
        BeginRestore(image=str(tmp_path / "t.qcow2"), size=8 * MiB)
    )
    client = await NBDClient.connect(Address("unix", path=restore.socket), began["export"])
    try:
        assert client.extended
        await client.flush()  # opens the upstream link
        first, second = random.Random(4).randbytes(3 * MiB + 7), random.Random(5).randbytes(999)
        await client.write(12345, first)
        await client.write(5 * MiB + 1, second, flags=1)  # FUA
        assert await client.read(12345, len(first)) == first
        assert await client.read(5 * MiB + 1, len(second)) == second
    finally:
        await client.close()
    assert spliced == [len(first), len(second)]
    assert restore.sessions.list()[0]["written_bytes"] == len(first) + len(second)
    await restore.sessions.end(began["id"])


async def _connected(restore: Served, export: str) -> RawClient:
    """A raw client whose connection has its upstream link (a FLUSH answered)."""
    client = await RawClient.connect(restore.socket)
    await client.handshake(export)
    client.writer.write(spec.request(spec.CMD_FLUSH, 1, 0, 0))
    answers = await client.answers({1})
    assert answers[1].error == 0
    return client


async def test_client_gone_in_the_middle_of_a_payload(
    restore: Served, tmp_path: Path, spliced: list[int]
) -> None:
    size = 8 * MiB
    image = tmp_path / "t.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=size))
    client = await _connected(restore, began["export"])
    client.writer.write(spec.request(spec.CMD_WRITE, 2, 0, 4 * MiB) + b"\xaa" * (3 * MiB))
    await client.writer.drain()
    for _ in range(100):  # until the intake has begun that WRITE
        if spliced:
            break
        await asyncio.sleep(0.02)
    assert spliced == [4 * MiB]
    client.writer.close()
    # The daemon serves the next client, and nothing of the cut WRITE landed.
    script = (
        "h.pwrite(b'\\x77' * 4096, 8192); h.flush(); print(h.pread(4 * 1024 * 1024, 0).count(0))"
    )
    out = await nbdsh(restore.uri(began["export"]), script)
    assert int(out) == 4 * MiB - 4096
    await restore.sessions.end(began["id"])
    expected = bytearray(size)
    expected[8192 : 8192 + 4096] = b"\x77" * 4096
    (tmp_path / "expected.raw").write_bytes(expected)
    assert await image_sha256(image) == file_sha256(tmp_path / "expected.raw")


async def test_qemu_gone_in_the_middle_of_a_payload(
    restore: Served, tmp_path: Path, spliced: list[int]
) -> None:
    began = await restore.sessions.begin(
        BeginRestore(image=str(tmp_path / "t.qcow2"), size=8 * MiB)
    )
    client = await _connected(restore, began["export"])
    client.writer.write(spec.request(spec.CMD_WRITE, 2, 0, 4 * MiB) + b"\xaa" * MiB)
    await client.writer.drain()
    for _ in range(100):
        if spliced:
            break
        await asyncio.sleep(0.02)
    assert spliced == [4 * MiB]
    qsd = restore.sessions._qsd
    assert qsd is not None and qsd.pid is not None
    os.kill(qsd.pid, signal.SIGKILL)
    await asyncio.sleep(0.3)
    # The rest of the payload is taken and thrown away; the WRITE gets its error, and the
    # connection answers what follows.
    client.writer.write(b"\xaa" * (3 * MiB) + spec.request(spec.CMD_FLUSH, 3, 0, 0))
    answers = await client.answers({2, 3})
    assert answers[2].error != 0 and answers[3].error != 0
    client.writer.close()
    # The daemon stays up: a new session (a new QSD) is written through at once.
    image = tmp_path / "after.qcow2"
    again = await restore.sessions.begin(BeginRestore(image=str(image), size=MiB))
    await nbdsh(restore.uri(again["export"]), "h.pwrite(b'\\x33' * 1048576, 0); h.flush()")
    await restore.sessions.end(again["id"])
    (tmp_path / "expected.raw").write_bytes(b"\x33" * MiB)
    assert await image_sha256(image) == file_sha256(tmp_path / "expected.raw")


async def _served(short_dir: Path, policy: ServerPolicy) -> Served:
    server = NBDServer(ExportCatalog(), policy)
    socket = str(short_dir / "custom.nbd")
    await server.listen(Address("unix", path=socket))
    state_dir = str(short_dir / "state")
    sessions = RestoreSessions(server.catalog, server.addresses, state_dir)
    return Served(sessions, server, socket, state_dir)


async def test_writes_wait_for_the_limits(
    short_dir: Path, tmp_path: Path, spliced: list[int]
) -> None:
    """Limits so tight that WRITE headers wait, held, for replies before their payloads
    are moved (and reading stops and starts again)."""
    served = await _served(short_dir, ServerPolicy(max_in_flight=3, max_buffered=300 * 1024))
    try:
        size = 24 * MiB
        source = tmp_path / "random.raw"
        source.write_bytes(random.Random(9).randbytes(size))
        image = tmp_path / "restored.qcow2"
        began = await served.sessions.begin(BeginRestore(image=str(image), size=size))
        await tool("nbdcopy", "--connections=1", str(source), served.uri(began["export"]))
        await served.sessions.end(began["id"])
        assert await image_sha256(image) == file_sha256(source)
        assert sum(spliced) >= size - MiB
    finally:
        await stop(served)


@pytest.fixture
async def restore_tls(short_dir: Path, certs: Certs) -> AsyncIterator[Served]:
    context = server_context(
        str(certs.server / "server-cert.pem"), str(certs.server / "server-key.pem")
    )
    served = await _served(short_dir, ServerPolicy(tls=TLSMode.REQUIRE, tls_context=context))
    try:
        yield served
    finally:
        await stop(served)


async def test_tls_clients_keep_the_general_path(
    restore_tls: Served, tmp_path: Path, certs: Certs, spliced: list[int]
) -> None:
    size = 16 * MiB + 512
    source = tmp_path / "random.raw"
    source.write_bytes(random.Random(3).randbytes(size))
    image = tmp_path / "restored.qcow2"
    began = await restore_tls.sessions.begin(BeginRestore(image=str(image), size=size))
    uri = (
        f"nbds+unix:///{began['export']}?socket={restore_tls.socket}"
        f"&tls-certificates={certs.backup}"
    )
    await tool("nbdcopy", str(source), uri)
    await restore_tls.sessions.end(began["id"])
    assert await image_sha256(image) == file_sha256(source)
    assert spliced == []
