"""The relay's fast path on a real socket: plain READs are forwarded upstream as the client
wrote them and whole replies spliced back; every other request, and READs the limits or the
export hold back, take the general path — with the same bytes for the client either way.
The upstream is the scripted fake of test_relay (QEMU 7.2's header forms)."""

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.exports.dirty_bitmap import DirtyBitmap
from nbdsrv.net.client import NBDClient
from nbdsrv.net.read_paths import ReadPaths
from nbdsrv.net.relay import ReadRelay
from nbdsrv.net.server import ServerPolicy
from nbdsrv.proto.constants import Command, CommandFlag
from nbdsrv.proto.errors import ReplyError
from tests.net.recorder import Recorder
from tests.net.test_relay import DATA, HOLE, SIZE, Setup, run, split_plan
from tests.net.test_status_fast_path import spy_on_the_fast_path

__all__ = ["run"]  # the fixture, used by name

KiB = 1024
C1 = "qemu:dirty-bitmap:c1"
BITMAP = DirtyBitmap(SIZE, 64 * KiB)
BITMAP.mark(128 * KiB, 64 * KiB)


class Forwards:
    """Counts the READs each path took, by wrapping the relay's two entries."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forwarded = 0
        self.general = 0
        forward, read = ReadRelay.forward, ReadRelay.read

        def counting_forward(relay: ReadRelay, data: bytes, requests: list[Any]) -> bool:
            taken = forward(relay, data, requests)
            self.forwarded += len(requests) if taken else 0
            return taken

        def counting_read(relay: ReadRelay, request: Any) -> None:
            self.general += 1
            read(relay, request)

        monkeypatch.setattr(ReadRelay, "forward", counting_forward)
        monkeypatch.setattr(ReadRelay, "read", counting_read)


@contextlib.asynccontextmanager
async def attached(
    tmp_path: Path, policy: ServerPolicy | None = None, contexts: tuple[str, ...] = ()
) -> AsyncIterator[tuple[Setup, NBDClient]]:
    """A session export in front of the fake upstream (with a dirty bitmap ``C1``), and a
    client (structured replies, compact headers) whose first READ — taken by the general
    path — has opened the connection's upstream link; closed at the end."""
    async with Setup(tmp_path, split_plan, bitmaps={C1: BITMAP}) as s:
        if policy is not None:
            s.server.policy = policy
        client = await NBDClient.connect(s.down, "vm/disk0", extended=False, contexts=contexts)
        assert await client.read(0, 512) == DATA[:512]
        yield s, client
        await client.close()


def test_plain_reads_are_forwarded_and_rebuild_the_data(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Forwards(monkeypatch)

    async def main() -> None:
        async with attached(tmp_path) as (_, client):
            parts = await asyncio.gather(
                *(client.read(o, 64 * KiB) for o in range(0, SIZE, 64 * KiB))
            )
            # Across the zero region, whose reply comes as data and hole chunks.
            middle = await client.read(HOLE[0] - 4 * KiB, HOLE[1] + 8 * KiB)
            assert hashlib.sha256(b"".join(parts)).digest() == hashlib.sha256(DATA).digest()
            assert middle == DATA[HOLE[0] - 4 * KiB : HOLE[0] + HOLE[1] + 4 * KiB]

    run(main())
    assert paths.forwarded >= SIZE // (64 * KiB)
    assert paths.general == 1


def test_holes_in_a_forwarded_read_still_pass_as_holes(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Forwards(monkeypatch)

    async def main() -> None:
        async with attached(tmp_path) as (_, client):
            sink = Recorder(0, SIZE)
            client.submit(Command.READ, 0, 0, SIZE, sink)
            assert await sink.future is None
            assert ("hole", HOLE[0], HOLE[1]) in sink.chunks
            assert bytes(sink.buffer) == DATA

    run(main())
    assert paths.forwarded == 1


def test_a_burst_with_other_requests_takes_the_general_path(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Forwards(monkeypatch)

    async def main() -> None:
        async with attached(tmp_path) as (_, client):
            client.cork()  # one write: READ, DF READ, CACHE, READ
            futures = [
                asyncio.ensure_future(client.read(0, 64 * KiB)),
                asyncio.ensure_future(client.read(64 * KiB, 64 * KiB, flags=CommandFlag.DF)),
                asyncio.ensure_future(client.request(Command.CACHE, 0, 0, 4096)),
                asyncio.ensure_future(client.read(128 * KiB, 64 * KiB)),
            ]
            await asyncio.sleep(0)  # every request submitted
            client.uncork()
            first, second, cached, third = await asyncio.gather(*futures)
            assert first + second + third == DATA[: 192 * KiB]
            assert cached is None

    run(main())
    assert paths.forwarded == 0
    assert paths.general == 4


def test_the_in_flight_limit_holds_for_forwarded_reads(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 READs in one write to a server that serves 4 at a time: the burst goes the general
    path (queued, started as others finish); never more than 4 relayed at once."""
    paths = Forwards(monkeypatch)
    most = [0]
    relayed_done = ReadPaths.relayed_done

    def watching(reads: ReadPaths, *args: Any) -> None:
        most[0] = max(most[0], reads._connection.flow.relayed)
        relayed_done(reads, *args)

    monkeypatch.setattr(ReadPaths, "relayed_done", watching)

    async def main() -> None:
        async with attached(tmp_path, ServerPolicy(max_in_flight=4)) as (_, client):
            client.cork()
            futures = [
                asyncio.ensure_future(client.read(o, 64 * KiB)) for o in range(0, SIZE, 64 * KiB)
            ]
            await asyncio.sleep(0)
            client.uncork()
            assert b"".join(await asyncio.gather(*futures)) == DATA

    run(main())
    assert paths.forwarded == 0
    assert 1 < most[0] <= 4


def test_reads_after_the_session_failed_are_refused_by_the_general_path(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Forwards(monkeypatch)

    async def main() -> None:
        async with attached(tmp_path) as (s, client):
            assert await client.read(512, 512) == DATA[512:1024]
            s.export.fail("point in time lost")
            with pytest.raises(ReplyError, match="point in time lost"):
                await client.read(0, 4096)

    run(main())
    assert paths.forwarded == 1
    assert paths.general == 2


def test_block_status_after_forwarded_reads_is_still_answered_at_once(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that reads and maps (nbdcopy does both) keeps both short paths."""
    paths = Forwards(monkeypatch)
    answered = spy_on_the_fast_path(monkeypatch)

    async def main() -> None:
        async with attached(tmp_path, contexts=(C1,)) as (_, client):
            assert await client.read(64 * KiB, 64 * KiB) == DATA[64 * KiB : 128 * KiB]
            status = await client.block_status(0, SIZE)
            assert status == {C1: [(128 * KiB, 0), (64 * KiB, 1), (SIZE - 192 * KiB, 0)]}
            assert await client.read(128 * KiB, 64 * KiB) == DATA[128 * KiB : 192 * KiB]

    run(main())
    assert answered == {"vm/disk0": 1}
    assert paths.forwarded == 2
