"""Whole replies moved as they came: a forwarded READ whose reply is one data chunk with DONE
covering it exactly is spliced from the upstream socket to the client, QEMU's header
included, and several such replies are gathered in the pipe and go on in one splice. Every
other reply (holes, several chunks, a cookie the relay had to change, an export that failed)
keeps its own path — the client gets the same bytes either way, checked by content.

The upstream is the scripted fake of test_relay (QEMU 7.2's header forms)."""

import asyncio
import errno
import hashlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.net.client import NBDClient
from nbdsrv.net.relay import ReadRelay
from nbdsrv.proto.client import Transmission
from nbdsrv.proto.errors import ReplyError
from nbdsrv.proto.server import Request
from tests.net.slow_reader import read_after_a_pause
from tests.net.test_relay import DATA, HOLE, SIZE, Chunk, Setup, run, split_plan

__all__ = ["run"]  # the fixture, used by name

KiB = 1024


class Verbatim:
    """Counts the replies moved verbatim, and the batches the relay queued for the client
    (one splice each when the client's socket has room)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.replies = 0
        self.flushed: list[int] = []
        peeked, flush = Transmission.peeked, ReadRelay.flush

        def counting_peeked(core: Transmission, head: Any) -> bool:
            taken = peeked(core, head)
            self.replies += taken
            return taken

        def counting_flush(relay: ReadRelay) -> None:
            before = relay._gathered
            flush(relay)
            if before and not relay._gathered:
                self.flushed.append(before)

        monkeypatch.setattr(Transmission, "peeked", counting_peeked)
        monkeypatch.setattr(ReadRelay, "flush", counting_flush)

    def reset(self) -> None:
        self.replies, self.flushed = 0, []


async def client_of(s: Setup) -> NBDClient:
    """Structured replies, compact headers: the form QEMU 7.2 speaks, so READs forward."""
    client = await NBDClient.connect(s.down, "vm/disk0", extended=False)
    assert await client.read(0, 512) == DATA[:512]  # opens the connection's upstream link
    return client


async def burst(client: NBDClient, ranges: list[tuple[int, int]]) -> list[bytearray]:
    """READs sent in one write: the relay forwards them together."""
    client.cork()
    futures = [asyncio.ensure_future(client.read(o, n)) for o, n in ranges]
    await asyncio.sleep(0)
    client.uncork()
    return list(await asyncio.gather(*futures))


def test_whole_replies_go_verbatim_and_gathered(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = Verbatim(monkeypatch)

    async def main() -> None:
        async with Setup(tmp_path, split_plan) as s:
            client = await client_of(s)
            moved.reset()
            ranges = [(o, 64 * KiB) for o in range(0, SIZE, 64 * KiB)] * 4
            random.Random(3).shuffle(ranges)
            parts = await burst(client, ranges)
            await client.close()
        for (offset, length), part in zip(ranges, parts, strict=True):
            assert (
                hashlib.sha256(part).digest()
                == hashlib.sha256(DATA[offset : offset + length]).digest()
            )

    run(main())
    # Every range but the two inside the hole region is one whole data chunk.
    whole = 4 * (SIZE // (64 * KiB) - 2)
    assert moved.replies == whole
    assert sum(moved.flushed) == whole * (64 * KiB + 28)
    assert max(moved.flushed) > 64 * KiB + 28  # several replies in one go


def test_a_reply_in_several_chunks_between_whole_ones_keeps_its_order(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data and hole chunks of one READ (spliced and written by the relay) come between
    replies gathered in the pipe: none lands inside another, each READ reads its data."""
    moved = Verbatim(monkeypatch)
    ranges = [
        (0, 128 * KiB),
        (HOLE[0] - 64 * KiB, HOLE[1] + 128 * KiB),  # data, hole, data
        (128 * KiB, 64 * KiB),
        (HOLE[0], HOLE[1]),  # one hole
        (SIZE - 256 * KiB, 256 * KiB),
        (HOLE[0] + 4 * KiB, 512),
        (192 * KiB, 64 * KiB),
    ]

    async def main() -> None:
        async with Setup(tmp_path, split_plan) as s:
            client = await client_of(s)
            moved.reset()
            for _ in range(3):
                parts = await burst(client, ranges)
                assert parts == [DATA[o : o + n] for o, n in ranges]
            await client.close()

    run(main())
    assert moved.replies == 3 * 4


def test_a_client_that_reads_slowly_gets_every_byte_through_a_full_pipe(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gathered replies fill the pipe behind a client that does not read: reading from
    upstream stops, then all resumes, in order."""
    moved = Verbatim(monkeypatch)

    async def main() -> None:
        async with Setup(tmp_path, split_plan) as s:
            client = await client_of(s)
            got = await read_after_a_pause(client, SIZE, 8)
            await client.close()
            assert hashlib.sha256(got).digest() == hashlib.sha256(DATA * 8).digest()

    run(main())
    assert moved.replies > 0


def test_reads_after_the_session_failed_are_not_moved(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that arrives after the export failed is dropped, not passed on: EIO."""
    moved = Verbatim(monkeypatch)

    async def main() -> None:
        async with Setup(tmp_path, split_plan) as s:
            client = await client_of(s)
            before = moved.replies
            # The export fails between forwarding and the reply's arrival.
            forward = ReadRelay.forward

            def failing_forward(relay: ReadRelay, data: bytes, requests: list[Any]) -> bool:
                taken = forward(relay, data, requests)
                s.export.fail("point in time lost")
                return taken

            monkeypatch.setattr(ReadRelay, "forward", failing_forward)
            with pytest.raises(ReplyError) as excinfo:
                await burst(client, [(0, 64 * KiB)])
            assert excinfo.value.errno == errno.EIO
            assert moved.replies == before
            await client.close()

    run(main())


def cut_after_some(request: Request) -> list[Chunk]:
    """Whole replies, but the one at 512 KiB breaks off half way with the connection."""
    if request.offset == 512 * KiB:
        return [("cut", request.offset, request.length)]
    return split_plan(request)


def test_upstream_gone_in_the_middle_of_a_verbatim_reply_closes_the_client(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path
) -> None:
    """Half a reply in the pipe cannot be taken back: the client's connection closes, and
    no READ is answered with data QEMU did not send."""

    async def main() -> None:
        async with Setup(tmp_path, cut_after_some) as s:
            client = await client_of(s)
            ranges = [(o, 64 * KiB) for o in range(0, SIZE, 64 * KiB)]
            futures = [asyncio.ensure_future(client.read(o, n)) for o, n in ranges]
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
            for (offset, length), result in zip(ranges, results, strict=True):
                if isinstance(result, BaseException):
                    assert isinstance(result, ReplyError) and result.errno == errno.EIO
                else:
                    assert result == DATA[offset : offset + length]
            assert isinstance(results[512 // 64], ReplyError)
            assert client.closed
            client.abort()

    run(main())
