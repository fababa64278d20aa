"""The upstream NBD client and relayed session reads against a fake upstream server whose READ
replies are scripted chunk by chunk — split into data and holes, out of order, short, empty,
overlapping, with error chunks — read by clients in every reply mode (simple, structured,
extended, DF), on asyncio's loop and on uvloop (the daemon's).

A fake protocol peer is fine here: what is tested is what nbdsrv does with every reply a
server may send, which QEMU cannot be made to send. Real QEMU behind sessions is tested in
tests/sessions.
"""

import asyncio
import errno
import hashlib
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.exports.dirty_bitmap import DirtyBitmap
from nbdsrv.exports.upstream import UpstreamExport
from nbdsrv.net.address import Address
from nbdsrv.net.client import NBDClient
from nbdsrv.net.server import NBDServer, ServerPolicy
from nbdsrv.proto import wire
from nbdsrv.proto.constants import (
    SIMPLE_REPLY_MAGIC,
    Command,
    CommandFlag,
    Option,
    Reply,
    ReplyFlag,
    ReplyType,
)
from nbdsrv.proto.errors import ReplyError
from nbdsrv.proto.server import Event, OptionError, Request, ServerConnection
from tests.net.recorder import Recorder
from tests.net.slow_reader import read_after_a_pause
from tests.proto.driver import FakeCatalog, FakeExport

KiB = 1024
SIZE = 1024 * KiB
DATA = random.Random(11).randbytes(SIZE)
# A zero region the upstream sends as holes.
HOLE = (256 * KiB, 128 * KiB)
DATA = DATA[: HOLE[0]] + bytes(HOLE[1]) + DATA[HOLE[0] + HOLE[1] :]

# A reply plan: (type, offset, length) chunks; "data", "hole", "error", "none".
Chunk = tuple[str, int, int]
Plan = Callable[[Request], list[Chunk]]


def split_plan(request: Request) -> list[Chunk]:
    """Data around the zero region, the zero region as a hole, in reverse order."""
    start, end = request.offset, request.offset + request.length
    hole_start, hole_end = max(start, HOLE[0]), min(end, HOLE[0] + HOLE[1])
    if request.flags & CommandFlag.DF or hole_start >= hole_end:
        return [("data", start, request.length)]
    chunks: list[Chunk] = []
    if hole_start > start:
        chunks.append(("data", start, hole_start - start))
    chunks.append(("hole", hole_start, hole_end - hole_start))
    if end > hole_end:
        chunks.append(("data", hole_end, end - hole_end))
    return list(reversed(chunks))


def simple_plan(request: Request) -> list[Chunk]:
    """A simple reply with the data (allowed without extended headers)."""
    return [("simple", request.offset, request.length)]


class QEMU72Connection(ServerConnection):
    """Without extended headers, like QEMU 7.2's NBD server."""

    def _handle_option(self, option: int, data: bytes, events: list[Event]) -> None:
        if option == Option.EXTENDED_HEADERS and not EXTENDED[0]:
            raise OptionError(Reply.ERR_UNSUP, "no extended headers")
        super()._handle_option(option, data, events)


EXTENDED = {0: False}  # whether the fake upstream offers extended headers


class FakeUpstream(asyncio.Protocol):
    """nbdsrv's own server core for the handshake; READ replies written as ``plan`` says."""

    def __init__(self, plan: Plan) -> None:
        export = FakeExport("up", "", SIZE, ("base:allocation",))
        self.core = QEMU72Connection(FakeCatalog(export))
        self.plan = plan
        self.transport: asyncio.Transport | None = None
        self.cut = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.core.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.core.receive(data):
            if isinstance(event, Request) and event.command == Command.READ:
                self.transport.write(self.reply(event))
                if self.cut:
                    self.transport.close()
                    return
        self.transport.write(self.core.data_to_send())

    def reply(self, request: Request) -> bytes:
        core, out = self.core, bytearray()
        chunks = self.plan(request)
        for i, (kind, offset, length) in enumerate(chunks):
            flags = ReplyFlag.DONE if i == len(chunks) - 1 else 0
            if kind == "data":
                payload = wire.OFFSET_DATA.pack(offset) + DATA[offset : offset + length]
                out += core.chunk_header(request, flags, ReplyType.OFFSET_DATA, len(payload))
            elif kind == "hole":
                payload = wire.OFFSET_HOLE.pack(offset, length)
                out += core.chunk_header(request, flags, ReplyType.OFFSET_HOLE, len(payload))
            elif kind == "error":
                payload = wire.ERROR_CHUNK.pack(errno.ENOSPC, 4) + b"full"
                out += core.chunk_header(request, flags, ReplyType.ERROR, len(payload))
            elif kind == "cut":  # half the payload, then the connection breaks
                payload = wire.OFFSET_DATA.pack(offset) + DATA[offset : offset + length]
                out += core.chunk_header(request, flags, ReplyType.OFFSET_DATA, len(payload))
                out += payload[: len(payload) // 2]
                self.cut = True
                break
            elif kind == "simple":
                out += wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie)
                payload = DATA[request.offset : request.offset + request.length]
            else:
                payload = b""
                out += core.chunk_header(request, flags, ReplyType.NONE, 0)
            out += payload
        return bytes(out)


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Awaitable[Any]], Any]]:
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield runner.run


async def serve_upstream(path: Path, plan: Plan) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: FakeUpstream(plan), str(path))


class Setup:
    """Fake upstream ← UpstreamExport ``vm/disk0`` ← nbdsrv's server, all in one loop."""

    def __init__(
        self,
        tmp: Path,
        plan: Plan,
        *,
        zero_copy: bool = True,
        bitmaps: Mapping[str, DirtyBitmap] | None = None,
    ) -> None:
        self.tmp, self.plan = tmp, plan
        self.zero_copy = zero_copy
        self.bitmaps = dict(bitmaps or {})
        self.up = Address("unix", path=str(tmp / "up.sock"))
        self.down = Address("unix", path=str(tmp / "nbd.sock"))

    async def __aenter__(self) -> "Setup":
        self.upstream = await serve_upstream(self.tmp / "up.sock", lambda r: self.plan(r))
        self.export = UpstreamExport("vm/disk0", SIZE, self.up, "up", self.bitmaps)
        await self.export.open()
        self.catalog = ExportCatalog()
        self.catalog.add(self.export)
        self.server = NBDServer(self.catalog, ServerPolicy(zero_copy=self.zero_copy))
        await self.server.listen(self.down)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        await self.export.aclose()
        self.upstream.close()


MODES = {
    "simple": {"structured": False, "extended": False},
    "structured": {"structured": True, "extended": False},
    "extended": {"structured": True, "extended": True},
}
RANGES = [(0, SIZE), (200 * KiB, 300 * KiB), (HOLE[0], HOLE[1]), (HOLE[0] + 4 * KiB, 512)]


@pytest.mark.parametrize(
    ("plan", "upstream_extended"),
    [(split_plan, False), (simple_plan, False), (split_plan, True)],
    ids=["split", "simple", "split-extended"],
)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "copy"])
def test_relayed_reads_rebuild_the_data_in_every_reply_mode(
    run: Callable[[Awaitable[Any]], Any],
    tmp_path: Path,
    mode: str,
    plan: Plan,
    upstream_extended: bool,
    zero_copy: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(EXTENDED, 0, upstream_extended)

    async def main() -> None:
        async with Setup(tmp_path, plan, zero_copy=zero_copy) as s:
            assert all(c.extended == upstream_extended for c in s.export._clients)
            client = await NBDClient.connect(s.down, "vm/disk0", **MODES[mode])
            for offset, length in RANGES:
                assert await client.read(offset, length) == DATA[offset : offset + length]
                if client.structured:
                    got = await client.read(offset, length, flags=CommandFlag.DF)
                    assert got == DATA[offset : offset + length]
            # Many reads in flight at once, the whole disk by 64 KiB.
            parts = await asyncio.gather(
                *(client.read(o, 64 * KiB) for o in range(0, SIZE, 64 * KiB))
            )
            await client.close()
            assert hashlib.sha256(b"".join(parts)).digest() == hashlib.sha256(DATA).digest()

    run(main())


def test_holes_pass_through_as_holes(run: Callable[[Awaitable[Any]], Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with Setup(tmp_path, split_plan) as s:
            client = await NBDClient.connect(s.down, "vm/disk0")
            sink = Recorder(0, SIZE)
            client.submit(Command.READ, 0, 0, SIZE, sink)
            assert await sink.future is None
            await client.close()
            assert sink.chunks == [
                (kind, o, n)
                for kind, o, n in split_plan(Request(1, Command.READ, CommandFlag(0), 0, SIZE))
            ]
            assert bytes(sink.buffer) == DATA

    run(main())


def half(request: Request) -> list[Chunk]:
    return [("data", request.offset, request.length // 2)]


def nothing(request: Request) -> list[Chunk]:
    return [("none", 0, 0)]


def only_hole_short(request: Request) -> list[Chunk]:
    return [("hole", request.offset, request.length - 512)]


def overlapping(request: Request) -> list[Chunk]:
    n = request.length // 2
    return [("data", request.offset, n + 512), ("data", request.offset + n, n)]


def data_then_error(request: Request) -> list[Chunk]:
    return [("data", request.offset, request.length), ("error", 0, 0)]


def error_then_data(request: Request) -> list[Chunk]:
    return [("error", 0, 0), ("data", request.offset, request.length)]


def beyond(request: Request) -> list[Chunk]:
    return [
        ("data", request.offset + 512, request.length - 512),
        ("hole", request.offset, 512),
        ("hole", request.offset + request.length, 512),
    ]


BAD_PLANS = [half, nothing, only_hole_short, overlapping, data_then_error, error_then_data, beyond]


@pytest.mark.parametrize("plan", BAD_PLANS, ids=[p.__name__ for p in BAD_PLANS])
def test_upstream_client_fails_a_read_its_reply_does_not_cover(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, plan: Plan
) -> None:
    """The client itself: never zeroes for what the server did not send."""

    async def main() -> None:
        upstream = await serve_upstream(tmp_path / "up.sock", plan)
        client = await NBDClient.connect(Address("unix", path=str(tmp_path / "up.sock")), "up")
        for _ in range(2):  # the connection stays usable
            with pytest.raises(ReplyError) as excinfo:
                await client.read(64 * KiB, 64 * KiB)
            assert excinfo.value.errno in (errno.EIO, errno.ENOSPC)
        await client.close()
        upstream.close()

    run(main())


@pytest.mark.parametrize("plan", BAD_PLANS, ids=[p.__name__ for p in BAD_PLANS])
@pytest.mark.parametrize("mode", list(MODES))
def test_relayed_read_with_a_bad_upstream_reply_is_eio(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, plan: Plan, mode: str
) -> None:
    async def main() -> None:
        async with Setup(tmp_path, plan) as s:
            client = await NBDClient.connect(s.down, "vm/disk0", **MODES[mode])
            for flags in (0, CommandFlag.DF) if client.structured else (0,):
                with pytest.raises(ReplyError) as excinfo:
                    await client.read(64 * KiB, 64 * KiB, flags=flags)
                assert excinfo.value.errno == errno.EIO
                # The first failure QEMU relays fails the export (issue 19 §4) ...
                assert s.export.broken() is not None
                s.export.failure = None
            # ... and the connection stays in step: good replies go through on it afterwards.
            s.plan = split_plan
            assert await client.read(0, SIZE) == DATA
            await client.close()

    run(main())


def test_failed_session_sends_no_more_data(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path
) -> None:
    async def main() -> None:
        async with Setup(tmp_path, split_plan) as s:
            client = await NBDClient.connect(s.down, "vm/disk0")
            assert await client.read(0, 4096) == DATA[:4096]
            s.export.fail("point in time lost")
            with pytest.raises(ReplyError) as excinfo:
                await client.read(0, 4096)
            assert excinfo.value.errno == errno.EIO
            s.catalog.remove("vm/disk0")
            with pytest.raises(ReplyError) as excinfo:
                await client.read(0, 4096)
            assert excinfo.value.errno == errno.ESHUTDOWN
            await client.close()

    run(main())


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "copy"])
def test_a_client_that_reads_slowly_gets_every_byte(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, zero_copy: bool
) -> None:
    """Replies pile up behind a client that does not read: the client socket fills, then
    the pipe, then reading from upstream stops — and all resumes in order."""

    async def main() -> None:
        async with Setup(tmp_path, split_plan, zero_copy=zero_copy) as s:
            client = await NBDClient.connect(s.down, "vm/disk0")
            got = await read_after_a_pause(client, SIZE, 8)
            await client.close()
            assert got == DATA * 8

    run(main())


def cut(request: Request) -> list[Chunk]:
    return [("cut", request.offset, request.length)]


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "copy"])
def test_upstream_gone_in_the_middle_of_a_payload_fails_the_read(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, zero_copy: bool
) -> None:
    """Half a payload sent downstream cannot be taken back: the client's connection closes
    (spliced) or the read fails (copied); never data that QEMU did not send."""

    async def main() -> None:
        async with Setup(tmp_path, cut, zero_copy=zero_copy) as s:
            client = await NBDClient.connect(s.down, "vm/disk0")
            with pytest.raises(ReplyError) as excinfo:
                await asyncio.wait_for(client.read(0, 256 * KiB), 10)
            assert excinfo.value.errno == errno.EIO
            assert client.closed == zero_copy
            client.abort()

    run(main())
