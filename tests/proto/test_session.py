"""asyncio sessions against the real in-process server on a unix socket."""

import asyncio
import logging
import random

import pytest

from . import spec
from .conftest import DATA_RUNS, GatedExport, ServedFile
from .rawclient import Answer, OptionRefused, RawClient

# Liveness guard only: a hung server fails the test instead of hanging the suite.
GUARD = 60


async def settle(served: ServedFile) -> None:
    """Wait until the server has dropped every connection."""

    async def empty() -> None:
        while served.server.connections:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(empty(), GUARD)


def other_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.mark.parametrize("structured", [False, True])
async def test_hundred_requests_in_flight_are_answered_and_matched_by_cookie(
    served: ServedFile, structured: bool
) -> None:
    client = await RawClient.connect(served.socket)
    await client.handshake("disk", structured=structured)
    rng = random.Random(7)
    wanted: dict[int, tuple[int, int]] = {}
    for cookie in rng.sample(range(1, 1 << 62), 100):
        offset = rng.randrange(0, len(served.content) - 1)
        length = rng.randint(1, min(65536, len(served.content) - offset))
        wanted[cookie] = (offset, length)
        client.read(cookie, offset, length)
    answers = await asyncio.wait_for(client.answers(set(wanted)), GUARD)
    assert set(answers) == set(wanted)
    for cookie, (offset, length) in wanted.items():
        answer = answers[cookie]
        assert (answer.error, answer.done) == (0, 1)
        assert bytes(answer.data) == served.content[offset : offset + length]
    await client.disconnect()
    await settle(served)


async def test_block_status_on_a_sparse_file_covers_the_request(served: ServedFile) -> None:
    client = await RawClient.connect(served.socket)
    await client.handshake("disk", contexts=("base:allocation",))
    for cookie in range(1, 51):
        client.block_status(cookie, (cookie - 1) * 4096, 65536, spec.FLAG_REQ_ONE * (cookie % 2))
    answers = await asyncio.wait_for(client.answers(set(range(1, 51))), GUARD)
    for cookie, answer in answers.items():
        (extents,) = answer.extents.values()
        assert answer.error == 0 and sum(n for n, _ in extents) <= 65536
        assert all(flags in (0, 3) for _, flags in extents)
        if cookie % 2:
            assert len(extents) == 1
    await client.disconnect()


async def test_replies_come_out_of_order_when_an_earlier_read_is_slow(served: ServedFile) -> None:
    export = GatedExport("gated", served.path, gated={0})
    served.catalog.add(export)
    client = await RawClient.connect(served.socket)
    await client.handshake("gated")
    client.read(1, 0, 4096)  # waits at the gate
    client.read(2, 8192, 4096)
    answers: dict[int, Answer] = {}
    assert await asyncio.wait_for(client.next_reply(answers), GUARD) == 2
    export.gate.set()
    assert await asyncio.wait_for(client.next_reply(answers), GUARD) == 1
    assert bytes(answers[1].data) == served.content[0:4096]
    assert bytes(answers[2].data) == served.content[8192:12288]
    await client.disconnect()


@pytest.mark.parametrize("structured", [False, True])
async def test_removed_export_gives_eshutdown_to_a_connected_client(
    served: ServedFile, structured: bool
) -> None:
    client = await RawClient.connect(served.socket)
    await client.handshake("disk", structured=structured)
    assert await client.pread(0, 512) == served.content[:512]
    served.catalog.remove("disk")
    client.read(2, 0, 512)
    answer = (await asyncio.wait_for(client.answers({2}), GUARD))[2]
    assert answer.error == spec.ESHUTDOWN
    await client.disconnect()


async def test_removed_export_is_unknown_to_a_new_client(served: ServedFile) -> None:
    served.catalog.remove("disk")
    client = await RawClient.connect(served.socket)
    with pytest.raises(OptionRefused) as refused:
        await client.handshake("disk")
    assert refused.value.reply_type == spec.REP_ERR_UNKNOWN
    assert [r.type for r in await client.option(spec.OPT_LIST)] == [spec.REP_ACK]
    client.writer.close()


async def test_stop_lets_requests_in_flight_finish_then_closes(served: ServedFile) -> None:
    offsets = {0, 4096, 8192, 524288, 528384}
    export = GatedExport("gated", served.path, gated=offsets)
    served.catalog.add(export)
    client = await RawClient.connect(served.socket)
    await client.handshake("gated")
    for offset in offsets:
        client.read(offset + 1, offset, 4096)
    await asyncio.wait_for(export.all_waiting.wait(), GUARD)
    stopping = asyncio.get_running_loop().create_task(served.server.stop())
    for _ in range(10):  # let stop() run as far as it can while the reads wait
        await asyncio.sleep(0)
    assert not stopping.done() and served.server.connections
    export.gate.set()
    answers = await asyncio.wait_for(client.answers({o + 1 for o in offsets}), GUARD)
    for offset in offsets:
        assert answers[offset + 1].error == 0
        assert bytes(answers[offset + 1].data) == served.content[offset : offset + 4096]
    assert await asyncio.wait_for(client.reader.read(), GUARD) == b""  # then it hangs up
    await asyncio.wait_for(stopping, GUARD)
    assert not served.server.connections
    client.writer.close()


async def test_stop_closes_a_client_still_negotiating(served: ServedFile) -> None:
    client = await RawClient.connect(served.socket)
    await client.reader.readexactly(spec.L_GREETING.size)
    await settle_connected(served, 1)
    await asyncio.wait_for(served.server.stop(), GUARD)
    assert await asyncio.wait_for(client.reader.read(), GUARD) == b""
    client.writer.close()


async def settle_connected(served: ServedFile, n: int) -> None:
    async def reached() -> None:
        while len(served.server.connections) < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(reached(), GUARD)


def garbage(rng: random.Random) -> bytes:
    """Random bytes, sometimes behind a valid prefix so they hit a later phase."""
    prefix = rng.choice(
        [
            b"",
            spec.u32(3),
            spec.u32(3) + spec.option(spec.OPT_GO, spec.info_data("disk")),
            spec.u32(3)
            + spec.option(spec.OPT_STRUCTURED_REPLY)
            + spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:",)))
            + spec.option(spec.OPT_GO, spec.info_data("disk")),
            spec.u32(1) + spec.option(spec.OPT_EXPORT_NAME, b"disk"),
            spec.u32(3) + spec.option(spec.OPT_EXTENDED_HEADERS),
        ]
    )
    body = b""
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.4:
            body += rng.randbytes(rng.randint(1, 200))
        elif kind < 0.7:
            cmd = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, rng.randrange(1 << 16)])
            length = rng.choice([0, 1, 512, 1 << 20, 1 << 25, 0xFFFFFFFF])
            offset = rng.choice([0, 4096, (1 << 20) - 1, 1 << 40])
            body += spec.request(cmd, rng.randrange(1 << 64), offset, length, rng.randrange(64))
        else:
            opt = rng.randrange(14)
            body += spec.option(opt, rng.randbytes(rng.randint(0, 40)))
    return prefix + body


async def test_garbage_never_kills_the_server_nor_leaks_connections(
    served: ServedFile, caplog: pytest.LogCaptureFixture
) -> None:
    good = await RawClient.connect(served.socket)
    await good.handshake("disk", contexts=("base:allocation",))
    rng = random.Random(1234)
    for _ in range(60):
        reader, writer = await asyncio.open_unix_connection(served.socket)
        writer.write(garbage(rng))
        if rng.random() < 0.5:
            writer.close()  # hang up at once
            continue
        writer.write_eof()
        # The server answers what it can, then closes: on EOF or on a protocol error.
        await asyncio.wait_for(reader.read(), GUARD)
        writer.close()
    # A client connected all along, and a new one, still get correct data.
    for offset, length in DATA_RUNS:
        assert await good.pread(offset, length) == served.content[offset : offset + length]
    fresh = await RawClient.connect(served.socket)
    await fresh.handshake("disk", structured=False)
    assert await fresh.pread(0, len(served.content)) == served.content
    await good.disconnect()
    await fresh.disconnect()
    await settle(served)
    # No request task outlives its connection.
    await asyncio.sleep(0)
    assert not {t for t in other_tasks() if not t.done()}
    # Garbage is a protocol error (a warning), never an unexpected failure in a request.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_read_in_flight_when_its_export_is_removed_gets_eshutdown(served: ServedFile) -> None:
    export = GatedExport("gated", served.path, gated={0})
    served.catalog.add(export)
    client = await RawClient.connect(served.socket)
    await client.handshake("gated")
    client.read(1, 0, 4096)
    await asyncio.wait_for(export.all_waiting.wait(), GUARD)
    served.catalog.remove("gated")
    export.gate.set()
    answer = (await asyncio.wait_for(client.answers({1}), GUARD))[1]
    assert answer.error == spec.ESHUTDOWN
    await client.disconnect()


async def wait_waiting(export: GatedExport, n: int) -> None:
    async def reached() -> None:
        while export.waiting < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(reached(), GUARD)


async def test_more_requests_than_the_server_serves_at_once_are_all_answered(
    served: ServedFile,
) -> None:
    offsets = set(range(0, 200 * 512, 512))
    export = GatedExport("gated", served.path, gated=offsets)
    served.catalog.add(export)
    client = await RawClient.connect(served.socket)
    await client.handshake("gated")
    for offset in offsets:
        client.read(offset + 1, offset, 512)
    await wait_waiting(export, 32)  # the server holds many; it may stop reading for a while
    export.gate.set()
    answers = await asyncio.wait_for(client.answers({o + 1 for o in offsets}), GUARD)
    for offset in offsets:
        assert bytes(answers[offset + 1].data) == served.content[offset : offset + 512]
    await client.disconnect()


@pytest.mark.parametrize("how", ["disc", "eof"])
async def test_requests_in_flight_are_answered_before_a_polite_close(
    served: ServedFile, how: str
) -> None:
    export = GatedExport("gated", served.path, gated={0, 4096})
    served.catalog.add(export)
    client = await RawClient.connect(served.socket)
    await client.handshake("gated")
    client.read(1, 0, 4096)
    client.read(2, 4096, 4096)
    await asyncio.wait_for(export.all_waiting.wait(), GUARD)
    if how == "disc":
        client.writer.write(spec.request(spec.CMD_DISC, 3, 0, 0))
    else:
        client.writer.write_eof()
    await client.writer.drain()
    export.gate.set()
    answers = await asyncio.wait_for(client.answers({1, 2}), GUARD)
    assert bytes(answers[1].data + answers[2].data) == served.content[:8192]
    assert await asyncio.wait_for(client.reader.read(), GUARD) == b""
    client.writer.close()
    await settle(served)


@pytest.mark.parametrize("how", ["disc", "eof"])
async def test_requests_sent_together_with_the_close_are_answered(
    served: ServedFile, how: str
) -> None:
    client = await RawClient.connect(served.socket)
    await client.handshake("disk")
    # Reads and the close in one write: they reach the server in one data_received.
    batch = b"".join(
        spec.request(spec.CMD_READ, cookie, (cookie - 1) * 4096, 4096) for cookie in (1, 2, 3)
    )
    if how == "disc":
        batch += spec.request(spec.CMD_DISC, 4, 0, 0)
    client.reads.update({c: ((c - 1) * 4096, 4096) for c in (1, 2, 3)})
    client.writer.write(batch)
    if how == "eof":
        client.writer.write_eof()
    await client.writer.drain()
    answers = await asyncio.wait_for(client.answers({1, 2, 3}), GUARD)
    data = b"".join(bytes(answers[c].data) for c in (1, 2, 3))
    assert data == served.content[: 3 * 4096]
    assert await asyncio.wait_for(client.reader.read(), GUARD) == b""
    client.writer.close()
    await settle(served)
