"""Block status of a session's frozen dirty bitmaps, answered straight from data_received (the
fast path), against the same server's general path over a real socket, on asyncio's loop and
on uvloop (the daemon's); and real clients — qemu-img map (one REQ_ONE request per extent)
and nbdinfo --map — against the bitmap itself.

Two exports of one server hold the same bitmaps: ``fast`` is a session export as the daemon
makes it; ``general`` is the same export with no status source, so every request takes the
general path (Request event, _start, packed_extents, block_status_reply). No upstream is
running: block status of dirty bitmaps never goes to QEMU.
"""

import asyncio
import errno
import json
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.exports.dirty_bitmap import DirtyBitmap
from nbdsrv.exports.upstream import UpstreamExport
from nbdsrv.net.address import Address
from nbdsrv.net.client import NBDClient
from nbdsrv.net.limits import POLL_WINDOW
from nbdsrv.net.server import ServerPolicy
from nbdsrv.net.status_paths import MAX_POLL_BACKOFF, StatusPaths
from nbdsrv.proto.constants import Command
from nbdsrv.proto.errors import ReplyError
from nbdsrv.proto.extents import StatusSource
from nbdsrv.proto.server import ServerConnection
from tests.harness.extents import merged
from tests.harness.in_process import start_server
from tests.harness.tools import require_tool
from tests.proto import spec
from tests.proto.rawclient import RawClient

K = 1024
G = 64 * K
SIZE = (1 << 30) - 1000  # a partial last block
C1, C2 = "qemu:dirty-bitmap:c1", "qemu:dirty-bitmap:c2"


def bitmap(seed: int) -> DirtyBitmap:
    """Dirty runs of 1 to 3 blocks at seeded places, the first and the last block among them."""
    rng = random.Random(seed)
    out = DirtyBitmap(SIZE, G)
    blocks = len(out.bits)
    for block in [0, blocks - 1, *rng.sample(range(blocks), 150)]:
        out.mark(block * G, rng.randint(1, 3) * G)
    return out


BITMAPS = {C1: bitmap(1), C2: bitmap(2)}


def truth(context: str, offset: int = 0, length: int = SIZE) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, f in BITMAPS[context].extents(offset, length, 1 << 30):
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out


class GeneralPath(UpstreamExport):
    """The same export, answered without the fast path."""

    def status_source(self, context: str, *, extended: bool) -> StatusSource | None:
        return None


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Awaitable[Any]], Any]]:
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield runner.run


class BothPaths:
    """One in-process server exporting the fast and the general export."""

    def __init__(self, tmp: Path) -> None:
        self.address = Address("unix", path=str(tmp / "nbd.sock"))
        nowhere = Address("unix", path=str(tmp / "no-qemu.sock"))
        self.exports = {
            kind: cls(f"vm/{kind}", SIZE, nowhere, "disk0", BITMAPS)
            for kind, cls in (("fast", UpstreamExport), ("general", GeneralPath))
        }
        self.counted: list[tuple[str, str, int]] = []

    async def __aenter__(self) -> "BothPaths":
        catalog = ExportCatalog()
        for export in self.exports.values():
            catalog.add(export)
        self.server, _ = await start_server(catalog, self.address.path)
        self.server.on_request = lambda *a: self.counted.append(a)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def connect(
        self, kind: str, contexts: tuple[str, ...], extended: bool = False
    ) -> NBDClient:
        return await NBDClient.connect(
            self.address, f"vm/{kind}", contexts=contexts, extended=extended
        )


def spy_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Requests answered by ServerConnection.answer_status, per export."""
    answered: dict[str, int] = {}
    real = ServerConnection.answer_status

    def spy(
        self: ServerConnection, data: bytes, sources: Sequence[tuple[int, StatusSource]]
    ) -> tuple[bytes, int] | None:
        result = real(self, data, sources)
        if result is not None:
            assert self.export is not None
            answered[self.export.name] = answered.get(self.export.name, 0) + result[1]
        return result

    monkeypatch.setattr(ServerConnection, "answer_status", spy)
    return answered


HEADERS = {"compact": False, "extended": True}
CONTEXTS = {"one-context": (C1,), "two-contexts": (C1, C2)}


async def walk(client: NBDClient, *, req_one: bool) -> dict[str, list[tuple[int, int]]]:
    """The whole disk, one request after the other, each from where the answer stopped (as
    qemu-img map and nbdinfo --map do), with lengths a compact request can carry."""
    seen: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    while offset < SIZE:
        status = await client.block_status(offset, min(SIZE - offset, 0xFFFFF000), req_one=req_one)
        step = min(sum(n for n, _ in extents) for extents in status.values())
        for context, extents in status.items():
            if req_one:
                assert len(extents) == 1
            covered = 0
            for n, f in extents:
                n = min(n, step - covered)
                if n <= 0:
                    break
                covered += n
                out = seen.setdefault(context, [])
                if out and out[-1][1] == f:
                    out[-1] = (out[-1][0] + n, f)
                else:
                    out.append((n, f))
        offset += step
    return seen


@pytest.mark.parametrize("req_one", [True, False], ids=["req-one", "whole-ranges"])
@pytest.mark.parametrize("contexts", list(CONTEXTS))
@pytest.mark.parametrize("headers", list(HEADERS))
def test_a_walk_over_the_disk_gets_the_bitmap_on_both_paths(
    run: Callable[[Awaitable[Any]], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    headers: str,
    contexts: str,
    req_one: bool,
) -> None:
    fast_path = spy_on_the_fast_path(monkeypatch)

    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            maps = {}
            for kind in ("fast", "general"):
                client = await served.connect(kind, CONTEXTS[contexts], HEADERS[headers])
                maps[kind] = await walk(client, req_one=req_one)
                await client.close()
            assert maps["fast"] == maps["general"] == {c: truth(c) for c in CONTEXTS[contexts]}
            counts = {kind: 0 for kind in maps}
            for export, command, read in served.counted:
                assert (command, read) == ("BLOCK_STATUS", 0)
                counts[export.removeprefix("vm/")] += 1
            assert counts["fast"] == counts["general"] > 0
            # Every request of the fast export took the fast path, none of the other's.
            assert fast_path == {"vm/fast": counts["fast"]}

    run(main())


# Requests sent in one write: (command, req_one, offset, length).
Burst = list[tuple[int, bool, int, int]]
BURSTS: dict[str, Burst] = {
    "req-one-walk": [
        (Command.BLOCK_STATUS, True, i * 7 * G + 3, SIZE - i * 7 * G - 3) for i in range(20)
    ],
    "mixed": [
        (Command.BLOCK_STATUS, False, 0, G),
        (Command.BLOCK_STATUS, True, SIZE - 1, 1),
        (Command.BLOCK_STATUS, False, 5 * G, 300 * G),
    ],
    "with-a-cache-request": [
        (Command.BLOCK_STATUS, True, 0, G),
        (Command.CACHE, False, 0, 4 * K),
        (Command.BLOCK_STATUS, False, 0, 9),
    ],
    "with-a-refused-request": [
        (Command.BLOCK_STATUS, True, 0, G),
        (Command.BLOCK_STATUS, True, SIZE, 1),
        (Command.BLOCK_STATUS, True, G, G),
    ],
}


async def burst_answers(served: BothPaths, kind: str, extended: bool, burst: Burst) -> list[object]:
    """Send ``burst`` in one write; what each request got: its extents per context, None
    (a successful CACHE) or the error number."""
    client = await served.connect(kind, (C1, C2), extended)

    async def one(command: int, req_one: bool, offset: int, length: int) -> object:
        try:
            if command == Command.BLOCK_STATUS:
                return await client.block_status(offset, length, req_one=req_one)
            await client.request(command, 0, offset, length)
            return None
        except ReplyError as e:
            return e.errno

    client.cork()
    tasks = [asyncio.ensure_future(one(*request)) for request in burst]
    await asyncio.sleep(0)  # each task has submitted its request into the cork
    client.uncork()
    out = [await task for task in tasks]
    await client.close()
    return out


@pytest.mark.parametrize("burst", list(BURSTS))
@pytest.mark.parametrize("headers", list(HEADERS))
def test_requests_in_one_write_are_answered_alike(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, headers: str, burst: str
) -> None:
    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            got = {
                kind: await burst_answers(served, kind, HEADERS[headers], BURSTS[burst])
                for kind in ("fast", "general")
            }
            assert got["fast"] == got["general"]
            for (command, req_one, offset, length), answer in zip(
                BURSTS[burst], got["fast"], strict=True
            ):
                if command != Command.BLOCK_STATUS:
                    assert answer is None
                elif offset + length > SIZE:
                    assert answer == errno.EINVAL
                else:
                    want = {c: truth(c, offset, length) for c in (C1, C2)}
                    assert answer == ({c: w[:1] for c, w in want.items()} if req_one else want)

    run(main())


def test_a_request_split_across_reads_is_answered(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path
) -> None:
    """Half a header in one read, the rest with a whole request in the next: the general path
    takes both, the connection then goes back to the fast path."""

    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            client = await RawClient.connect(served.address.path)
            await client.handshake("vm/fast", contexts=(C1,))
            first = spec.request(spec.CMD_BLOCK_STATUS, 1, 0, SIZE, spec.FLAG_REQ_ONE)
            second = spec.request(spec.CMD_BLOCK_STATUS, 2, 5 * G, G)
            third = spec.request(spec.CMD_BLOCK_STATUS, 3, SIZE - 1, 1, spec.FLAG_REQ_ONE)
            client.writer.write(first[:10])
            await client.writer.drain()
            await asyncio.sleep(0.05)
            client.writer.write(first[10:] + second)
            answers = await client.answers({1, 2})
            client.writer.write(third)
            answers |= await client.answers({3})
            (cid,) = answers[1].extents
            assert answers[1].extents[cid] == truth(C1)[:1]
            assert answers[2].extents[cid] == truth(C1, 5 * G, G)
            assert answers[3].extents[cid] == truth(C1, SIZE - 1, 1)
            assert all(a.error == 0 and a.done == 1 for a in answers.values())
            await client.disconnect()

    run(main())


@pytest.mark.parametrize("kind", ["fast", "general"])
def test_a_failed_session_answers_eio_and_a_removed_export_eshutdown(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, kind: str
) -> None:
    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            client = await served.connect(kind, (C1,))
            assert await client.block_status(0, G, req_one=True) == {C1: truth(C1, 0, G)[:1]}
            served.exports[kind].fail("copy-before-write broke the snapshot")
            with pytest.raises(ReplyError) as failed:
                await client.block_status(0, G, req_one=True)
            assert failed.value.errno == errno.EIO
            served.exports[kind].close()
            with pytest.raises(ReplyError) as gone:
                await client.block_status(0, G, req_one=True)
            assert gone.value.errno == errno.ESHUTDOWN
            await client.close()

    run(main())


def test_qemu_img_map_and_nbdinfo_get_the_bitmap(tmp_path: Path) -> None:
    """Real clients against the daemon's loop: qemu-img asks one extent per request (REQ_ONE),
    nbdinfo whole ranges; both on both paths, both equal to the bitmap."""
    qemu_img, nbdinfo = require_tool("qemu-img"), require_tool("nbdinfo")

    async def tool(*argv: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            sock = served.address.path
            for kind in ("fast", "general"):
                opts = (
                    f"driver=nbd,server.type=unix,server.path={sock},export=vm/{kind},"
                    f"x-dirty-bitmap={C1}"
                )
                entries = json.loads(
                    await tool(qemu_img, "map", "--output=json", "--image-opts", opts)
                )
                # qemu-img reads the dirty bit as a hole bit: dirty shows as "data": false.
                # QEMU rounds the disk up to whole sectors: its map ends at 2^30 - 512.
                got = merged([(e["length"], 0 if e["data"] else 1) for e in entries])
                n, f = got.pop()
                assert sum(n for n, _ in got) + n == -(-SIZE // 512) * 512
                got.append((n - (-SIZE % 512), f))
                assert got == truth(C1)
                uri = f"nbd+unix:///vm/{kind}?socket={sock}"
                entries = json.loads(await tool(nbdinfo, "--json", f"--map={C2}", uri))
                assert merged([(e["length"], e["type"]) for e in entries]) == truth(C2)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_a_client_that_only_maps_opens_no_upstream_connection(
    run: Callable[[Awaitable[Any]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection to QEMU that relays a client's READs is opened at its first READ."""
    opened: list[str] = []

    async def open_upstream(self: UpstreamExport) -> NBDClient:
        opened.append(self.name)
        raise OSError(errno.EIO, "no QEMU here")

    monkeypatch.setattr(UpstreamExport, "open_upstream", open_upstream)

    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            for kind in ("fast", "general"):
                client = await served.connect(kind, (C1,))
                assert await walk(client, req_one=False) == {C1: truth(C1)}
                await client.close()
            assert opened == []

    run(main())


def poll_rounds(answers: int) -> int:
    """How many answers poll for a next request when every window passes empty: the rule
    of StatusPaths.poll_next (the next 1, 2, 4 … 64 answers skip polling after a miss)."""
    polls, skip, backoff = 0, 0, 1
    for _ in range(answers):
        if skip:
            skip -= 1
            continue
        polls += 1
        skip, backoff = backoff, min(2 * backoff, MAX_POLL_BACKOFF)
    return polls


@pytest.mark.parametrize("window", [POLL_WINDOW, 0.0], ids=["polling", "no-polling"])
def test_a_client_slower_than_the_poll_window_is_polled_less_and_less(
    run: Callable[[Awaitable[Any]], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    window: float,
) -> None:
    """A client in the server's own event loop cannot answer while the server polls, so
    every window passes empty: polling backs off (and never runs with a window of 0)."""
    polls: list[int] = []
    real = StatusPaths._poll

    def counting(status: StatusPaths) -> None:
        polls.append(1)
        real(status)

    monkeypatch.setattr(StatusPaths, "_poll", counting)
    answered = spy_on_the_fast_path(monkeypatch)

    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            served.server.policy = ServerPolicy(poll_window=window)
            client = await served.connect("fast", (C1,))
            assert await walk(client, req_one=True) == {C1: truth(C1)}
            await client.close()

    run(main())
    count = answered["vm/fast"]
    assert count > 200
    assert len(polls) == (poll_rounds(count) if window else 0)


def test_two_qemu_img_maps_at_once_get_the_bitmap(tmp_path: Path) -> None:
    """Two REQ_ONE walkers in other processes: polling for one connection's next request
    leaves the other its turn, and both maps are the bitmap."""
    qemu_img = require_tool("qemu-img")

    async def qemu_img_map(sock: str) -> list[tuple[int, int]]:
        opts = f"driver=nbd,server.type=unix,server.path={sock},export=vm/fast,x-dirty-bitmap={C1}"
        proc = await asyncio.create_subprocess_exec(
            qemu_img, "map", "--output=json", "--image-opts", opts,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        got = merged([(e["length"], 0 if e["data"] else 1) for e in json.loads(out)])
        n, f = got.pop()
        got.append((n - (-SIZE % 512), f))  # QEMU rounds the disk up to whole sectors
        return got

    async def main() -> None:
        async with BothPaths(tmp_path) as served:
            sock = served.address.path
            first, second = await asyncio.gather(qemu_img_map(sock), qemu_img_map(sock))
            assert first == second == truth(C1)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
