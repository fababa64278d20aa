"""ServerConnection.answer_status — block status of in-memory contexts answered straight from
the received bytes — against the general path (receive → Request → block_status_reply of the
same packed descriptors) and against the bitmap itself.

The map (64 KiB blocks, a partial last block; D dirty)::

    block  0  1 |2  3  4 |5 ... 9 |10|11 ... 19|20 ... 25|26 ... 38|39 (partial)
                |D  D  D |        |D |         |D ... D  |         |D
"""

import struct
from collections.abc import Callable

import pytest

from nbdsrv.exports import dirty_runs
from nbdsrv.exports.dirty_bitmap import DirtyBitmap
from nbdsrv.exports.dirty_runs import DirtyRuns
from nbdsrv.proto.constants import MAX_BLOCK_STATUS_EXTENTS
from nbdsrv.proto.extents import StatusSource
from nbdsrv.proto.server import Request, ServerConnection
from tests.harness.extents import merged

from . import spec
from .driver import FakeCatalog, FakeExport, Outcome, feed, negotiate

K = 1024
G = 64 * K  # the bitmap's granularity
B0, B1 = "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"
SIZE = 40 * G - 1000
DIRTY = {B0: [(2, 3), (10, 1), (20, 6), (39, 1)], B1: [(0, 1), (5, 30)]}
# A disk whose runs are longer than a compact descriptor may be (2 GiB pieces then).
BIG = 12 << 30
BIG_DIRTY = {B0: [((6 << 30) // G, 1)], B1: [(0, 1)]}


def bitmap(size: int, marks: list[tuple[int, int]]) -> DirtyBitmap:
    out = DirtyBitmap(size, G)
    for first, count in marks:
        out.mark(first * G, count * G)
    return out


# The bitmaps themselves (the truth) and their runs (what the server answers from).
TRUTH = {
    size: {name: bitmap(size, marks) for name, marks in dirty.items()}
    for size, dirty in ((SIZE, DIRTY), (BIG, BIG_DIRTY))
}
RUNS = {
    size: {name: DirtyRuns(bitmap(size, marks)) for name, marks in dirty.items()}
    for size, dirty in ((SIZE, DIRTY), (BIG, BIG_DIRTY))
}


def connection(size: int, extended: bool, contexts: tuple[str, ...]) -> ServerConnection:
    export = FakeExport("map", "", size, (B0, B1))
    return negotiate(extended=extended, queries=contexts, export="map", catalog=FakeCatalog(export))


def sources(conn: ServerConnection) -> list[tuple[int, StatusSource]]:
    assert conn.export is not None
    runs = RUNS[conn.export.size]
    return [(c.id, runs[c.name].table(extended=conn.extended)) for c in conn.contexts]


def request(conn: ServerConnection, cookie: int, flags: int, offset: int, length: int) -> bytes:
    make = spec.ext_request if conn.extended else spec.request
    return make(spec.CMD_BLOCK_STATUS, cookie, offset, length, flags)


def general(conn: ServerConnection, data: bytes) -> Outcome:
    """What the server sends for ``data`` on the general path: the core's own output, then
    for each request the reply the I/O layer builds from Export.packed_extents."""
    out = feed(conn, [data])
    assert conn.export is not None
    runs = RUNS[conn.export.size]
    replies = bytearray(out.output)
    for event in out.events:
        assert isinstance(event, Request)
        limit = 1 if event.flags & spec.FLAG_REQ_ONE else MAX_BLOCK_STATUS_EXTENTS
        per_context = [
            (c.id, runs[c.name].packed(event.offset, event.length, limit, extended=conn.extended))
            for c in conn.contexts
        ]
        replies += conn.block_status_reply(event, per_context)
    return Outcome([], bytes(replies), out.error)


def check_against_the_bitmap(
    conn: ServerConnection, reply: bytes, flags: int, offset: int, length: int
) -> None:
    """Each context's chunk, checked with the spec's layouts against the bitmap's extents."""
    assert conn.export is not None
    chunks = spec.parse_replies(reply)
    assert [c.flags for c in chunks] == [0] * (len(chunks) - 1) + [spec.REPLY_FLAG_DONE]
    assert len(chunks) == len(conn.contexts)
    for chunk, context in zip(chunks, conn.contexts, strict=True):
        if conn.extended:
            assert (chunk.kind, chunk.type, chunk.offset) == (
                "ext",
                spec.TYPE_BLOCK_STATUS_EXT,
                offset,
            )
            context_id, got = spec.parse_extents_ext(chunk.payload)
        else:
            assert (chunk.kind, chunk.type) == ("chunk", spec.TYPE_BLOCK_STATUS)
            context_id, got = spec.parse_extents(chunk.payload)
            assert all(n <= dirty_runs.COMPACT_CAP for n, _ in got)
        assert context_id == context.id
        bits = TRUTH[conn.export.size][context.name]
        truth = merged(bits.extents(offset, length, 1 << 30))
        if flags & spec.FLAG_REQ_ONE:
            assert len(got) == 1
            n, f = got[0]
            assert f == truth[0][1] and 0 < n <= truth[0][0]
            if n < truth[0][0]:  # a compact piece of a long run: it ends 2 GiB from the run's start
                run_start = 0
                for run, _ in merged(bits.extents(0, conn.export.size, 1 << 30)):
                    if run_start + run > offset:
                        break
                    run_start += run
                assert not conn.extended and (offset + n - run_start) % dirty_runs.COMPACT_CAP == 0
        else:
            assert merged(got) == truth


REQ_ONE, FUA = spec.FLAG_REQ_ONE, spec.FLAG_FUA
# (size, flags, offset, length)
ANSWERED = {
    "req-one-at-0": (SIZE, REQ_ONE, 0, SIZE),
    "req-one-at-a-run-start": (SIZE, REQ_ONE, 2 * G, SIZE - 2 * G),
    "req-one-one-byte-before-a-run": (SIZE, REQ_ONE, 2 * G - 1, 100),
    "req-one-clipped-inside-a-run": (SIZE, REQ_ONE, 2 * G + 5, G),
    "req-one-last-clean-run": (SIZE, REQ_ONE, 26 * G, SIZE - 26 * G),
    "req-one-partial-last-block": (SIZE, REQ_ONE, 39 * G, SIZE - 39 * G),
    "req-one-last-byte": (SIZE, REQ_ONE, SIZE - 1, 1),
    "req-one-and-fua": (SIZE, REQ_ONE | FUA, 10 * G, G),
    "whole-disk": (SIZE, 0, 0, SIZE),
    "runs-inside-a-range": (SIZE, 0, 3 * G + 7, 20 * G),
    "inside-one-run": (SIZE, 0, 30 * G + 1, 10),
    "to-the-end": (SIZE, 0, 15 * G, SIZE - 15 * G),
    "fua-tolerated": (SIZE, FUA, 0, SIZE),
    "big-req-one-capped": (BIG, REQ_ONE, 0, 0xFFFFFFFF),
    "big-req-one-from-1-gib": (BIG, REQ_ONE, 1 << 30, 0xFFFFFFFF),
    "big-req-one-after-the-dirty-block": (BIG, REQ_ONE, (6 << 30) + G, 0xFFFFFFFF),
    "big-range": (BIG, 0, 1 << 30, 0xFFFFFFFF),
}
HEADERS = {"structured": False, "extended": True}
CONTEXTS = {"one-context": (B0,), "two-contexts": (B0, B1)}


@pytest.mark.parametrize("contexts", list(CONTEXTS))
@pytest.mark.parametrize("headers", list(HEADERS))
@pytest.mark.parametrize("case", list(ANSWERED))
def test_answered_at_once_as_the_general_path_answers(
    case: str, headers: str, contexts: str
) -> None:
    size, flags, offset, length = ANSWERED[case]
    fast = connection(size, HEADERS[headers], CONTEXTS[contexts])
    slow = connection(size, HEADERS[headers], CONTEXTS[contexts])
    data = request(fast, 7, flags, offset, length)
    answered = fast.answer_status(data, sources(fast))
    expected = general(slow, data)
    assert expected.error is None
    assert answered == (expected.output, 1)
    check_against_the_bitmap(fast, answered[0], flags, offset, length)
    # Nothing was left behind: the next request takes the fast path again.
    assert fast.answer_status(data, sources(fast)) == answered


@pytest.mark.parametrize("headers", list(HEADERS))
def test_several_requests_in_one_buffer_are_answered_in_order(headers: str) -> None:
    fast = connection(SIZE, HEADERS[headers], (B0,))
    slow = connection(SIZE, HEADERS[headers], (B0,))
    cases = [c for c in ANSWERED.values() if c[0] == SIZE]
    data = b"".join(request(fast, i, f, o, n) for i, (_, f, o, n) in enumerate(cases))
    answered = fast.answer_status(data, sources(fast))
    assert answered == (general(slow, data).output, len(cases))


@pytest.mark.parametrize("flags", [REQ_ONE, 0])
def test_extended_requests_longer_than_4_gib(flags: int) -> None:
    fast = connection(BIG, True, (B0, B1))
    slow = connection(BIG, True, (B0, B1))
    for offset, length in [(G, BIG - G), ((6 << 30) + G, 5 << 30)]:
        data = request(fast, 8, flags, offset, length)
        answered = fast.answer_status(data, sources(fast))
        assert answered == (general(slow, data).output, 1)
        check_against_the_bitmap(fast, answered[0], flags, offset, length)


def _buffered_first(conn: ServerConnection) -> bytes:
    """Half a request already received: the rest must take the general path."""
    whole = request(conn, 1, REQ_ONE, 0, SIZE)
    assert conn.receive(whole[:10]) == []
    return whole[10:]


def _ext(conn: ServerConnection, cmd: int, flags: int, offset: int, length: int) -> bytes:
    make = spec.ext_request if conn.extended else spec.request
    return make(cmd, 9, offset, length, flags)


# What the fast path leaves to receive(): data builders for a connection.
DECLINED: dict[str, Callable[[ServerConnection], bytes]] = {
    "read": lambda c: _ext(c, spec.CMD_READ, 0, 0, 512),
    "status-then-read": lambda c: request(c, 1, REQ_ONE, 0, G) + _ext(c, spec.CMD_READ, 0, 0, 512),
    "cache": lambda c: _ext(c, spec.CMD_CACHE, 0, 0, 512),
    "disconnect": lambda c: _ext(c, spec.CMD_DISC, 0, 0, 0),
    "unknown-command": lambda c: _ext(c, 99, 0, 0, 512),
    "past-the-end": lambda c: request(c, 1, 0, SIZE - 10, 11),
    "offset-past-the-end": lambda c: request(c, 1, REQ_ONE, SIZE + 1, 1),
    "zero-length": lambda c: request(c, 1, 0, 0, 0),
    "df-flag": lambda c: request(c, 1, spec.FLAG_DF, 0, G),
    "payload-len-flag": lambda c: request(c, 1, spec.FLAG_PAYLOAD_LEN, 0, G),
    "unknown-flag": lambda c: request(c, 1, 0x100, 0, G),
    "partial-header": lambda c: request(c, 1, REQ_ONE, 0, G)[:-1],
    "one-and-a-half": lambda c: request(c, 1, REQ_ONE, 0, G) + request(c, 2, 0, 0, G)[:7],
    "bad-magic": lambda c: b"\xff" + request(c, 1, REQ_ONE, 0, G)[1:],
    "empty": lambda c: b"",
}


@pytest.mark.parametrize("headers", list(HEADERS))
@pytest.mark.parametrize("case", list(DECLINED))
def test_everything_else_is_left_to_the_general_path_untouched(case: str, headers: str) -> None:
    fast = connection(SIZE, HEADERS[headers], (B0,))
    slow = connection(SIZE, HEADERS[headers], (B0,))
    data = DECLINED[case](fast)
    assert fast.answer_status(data, sources(fast)) is None
    assert feed(fast, [data]) == feed(slow, [data])


def test_bytes_of_an_unfinished_request_keep_the_fast_path_away() -> None:
    fast = connection(SIZE, False, (B0,))
    slow = connection(SIZE, False, (B0,))
    rest = _buffered_first(fast)
    _buffered_first(slow)
    assert fast.answer_status(rest, sources(fast)) is None
    assert fast.answer_status(rest + request(fast, 2, REQ_ONE, 0, G), sources(fast)) is None
    assert feed(fast, [rest]) == feed(slow, [rest])
    # Once the buffer is empty again, the fast path answers.
    data = request(fast, 3, REQ_ONE, 0, G)
    assert fast.answer_status(data, sources(fast)) == (general(slow, data).output, 1)


def test_nothing_is_answered_before_transmission() -> None:
    conn = ServerConnection(FakeCatalog(FakeExport("map", "", SIZE, (B0,))))
    conn.data_to_send()
    data = spec.u32(3)
    assert conn.answer_status(data, []) is None
    assert conn.receive(data) == []


def test_the_one_descriptor_reply_is_the_spec_layout() -> None:
    """Written out from the spec once, independent of the general path."""
    conn = connection(SIZE, False, (B0,))
    (context,) = conn.contexts
    data = request(conn, 0x1234, REQ_ONE, 2 * G + 5, SIZE - 2 * G - 5)
    payload = struct.pack(">III", context.id, 3 * G - 5, 1)
    assert conn.answer_status(data, sources(conn)) == (
        spec.chunk(spec.REPLY_FLAG_DONE, spec.TYPE_BLOCK_STATUS, 0x1234, payload),
        1,
    )
    ext = connection(SIZE, True, (B0,))
    data = request(ext, 0x1234, REQ_ONE, SIZE - 1, 1)
    payload = struct.pack(">IIQQ", context.id, 1, 1, 1)
    assert ext.answer_status(data, sources(ext)) == (
        spec.ext_chunk(spec.REPLY_FLAG_DONE, spec.TYPE_BLOCK_STATUS_EXT, 0x1234, SIZE - 1, payload),
        1,
    )
