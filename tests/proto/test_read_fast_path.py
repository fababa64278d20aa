"""The READ fast path of the relay, both halves without I/O:

- ``ServerConnection.read_requests`` takes a burst of plain READs straight from the received
  bytes — checked against the general path (``receive``), which must produce the same
  requests, and shown to take nothing it should not;
- ``Transmission.forwarded`` registers READs whose bytes were sent by the caller, all or
  none, and ``Transmission`` passes a whole single-chunk reply through on its short path
  and everything else on the general one.
"""

import random

import pytest

from nbdsrv.proto import wire
from nbdsrv.proto.client import Transmission
from nbdsrv.proto.constants import (
    MAX_READ_LENGTH,
    STRUCTURED_REPLY_MAGIC,
    Command,
    ReplyFlag,
    ReplyType,
)
from nbdsrv.proto.errors import ReplyError
from nbdsrv.proto.server import ServerConnection
from tests.net.recorder import Recorder

from . import spec
from .driver import DISK_SIZE, FakeCatalog, FakeExport, feed, negotiate

BIG = 64 << 20  # a disk on which a READ of the largest length fits


def read(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return spec.request(spec.CMD_READ, cookie, offset, length, flags)


def big_disk() -> ServerConnection:
    return negotiate(export="big", catalog=FakeCatalog(FakeExport("big", "", BIG, ())))


ACCEPTED = {
    "one": [read(1, 0, 4096)],
    "a burst": [read(c + 1, c * 65536, 65536) for c in range(16)],
    "the last byte": [read(9, DISK_SIZE - 1, 1)],
    "the whole disk": [read(3, 0, DISK_SIZE)],
    "a cookie twice": [read(5, 0, 512), read(5, 512, 512)],  # the relay decides about that
}


@pytest.mark.parametrize("requests", ACCEPTED.values(), ids=list(ACCEPTED))
def test_plain_reads_are_taken_as_the_general_path_would_take_them(requests: list[bytes]) -> None:
    data = b"".join(requests)
    fast, general = negotiate(), negotiate()
    assert fast.read_requests(data) == feed(general, [data]).events
    assert fast.data_to_send() == b""
    # Nothing was left buffered: the next request parses from a clean start.
    assert fast.read_requests(read(99, 0, 512)) == feed(general, [read(99, 0, 512)]).events


def test_a_read_of_the_largest_length_is_taken() -> None:
    conn = big_disk()
    requests = conn.read_requests(read(1, BIG - MAX_READ_LENGTH, MAX_READ_LENGTH))
    assert requests is not None and requests[0].length == MAX_READ_LENGTH


REFUSED = {
    "a partial header": read(1, 0, 4096)[:27],
    "a read and a half": read(1, 0, 4096) + read(2, 0, 4096)[:10],
    "DF": read(1, 0, 4096, spec.FLAG_DF),
    "FUA": read(1, 0, 4096, spec.FLAG_FUA),
    "block status": spec.request(spec.CMD_BLOCK_STATUS, 1, 0, 4096),
    "a read then block status": read(1, 0, 4096) + spec.request(spec.CMD_BLOCK_STATUS, 2, 0, 4096),
    "a write": spec.request(spec.CMD_WRITE, 1, 0, 4, payload=b"abcd"),
    "disconnect": spec.request(spec.CMD_DISC, 1, 0, 0),
    "zero length": read(1, 0, 0),
    "past the end": read(1, DISK_SIZE - 4096, 8192),
    "starting past the end": read(1, DISK_SIZE + 1, 1),
    "bad magic": b"\x00" + read(1, 0, 4096)[1:],
    "nothing": b"",
}


@pytest.mark.parametrize("data", REFUSED.values(), ids=list(REFUSED))
def test_anything_but_whole_plain_reads_is_left_to_the_general_path(data: bytes) -> None:
    fast, general = negotiate(), negotiate()
    assert fast.read_requests(data) is None
    # Nothing was consumed: the general path gives exactly what it gives a fresh connection.
    assert feed(fast, [data]) == feed(general, [data])


def test_an_oversized_read_is_left_to_the_general_path() -> None:
    assert big_disk().read_requests(read(1, 0, MAX_READ_LENGTH + 1)) is None


def test_extended_headers_and_buffered_bytes_take_the_general_path() -> None:
    extended = negotiate(extended=True)
    assert extended.read_requests(spec.ext_request(spec.CMD_READ, 1, 0, 4096)) is None
    conn = negotiate()
    first = read(1, 0, 4096)
    assert conn.receive(first[:10]) == []
    assert conn.read_requests(first[10:] + read(2, 0, 4096)) is None


# -- the client half -------------------------------------------------------------------------

DATA = random.Random(5).randbytes(256 * 1024)


def transmission() -> Transmission:
    core = Transmission(structured=True, extended=False)
    core.passthrough = True
    return core


def data_chunk(cookie: int, offset: int, length: int, flags: int = ReplyFlag.DONE) -> bytes:
    return wire.DATA_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie, 8 + length, offset
    )


def hole_chunk(cookie: int, offset: int, length: int, flags: int = ReplyFlag.DONE) -> bytes:
    return wire.STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, 12
    ) + wire.OFFSET_HOLE.pack(offset, length)


class Passing(Recorder):
    """A sink that takes every data payload it is offered as passed through (moved by the
    I/O layer), and keeps how its reply ended (no event loop here: no future)."""

    def __init__(self, offset: int, length: int) -> None:
        self.buffer = bytearray(length)
        self.offset = offset
        self.chunks: list[tuple[str, int, int]] = []
        self.offered: list[tuple[int, int, bool, ReplyError | None]] = []
        self.ended = False
        self.result: ReplyError | None = None

    def pass_data(self, offset: int, length: int, last: bool, error: ReplyError | None) -> bool:
        self.offered.append((offset, length, last, error))
        return True

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        return False

    def done(self, error: ReplyError | None) -> None:
        assert not self.ended
        self.ended, self.result = True, error


def receive(core: Transmission, data: bytes) -> None:
    """As the I/O layer does: into get_buffer, or moved (here: skipped) while passing."""
    view = memoryview(data)
    while view:
        if core.passing:
            n = min(core.passing, len(view))
            core.passed(n)
        else:
            buffer = core.get_buffer()
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            core.buffer_updated(n)
        view = view[n:]


def test_forwarded_reads_are_registered_all_or_none() -> None:
    core = transmission()
    sinks = [Passing(0, 4096), Passing(4096, 4096), Passing(8192, 4096)]
    assert core.forwarded([(7, 0, 4096, sinks[0])])
    # 7 is in flight: nothing of this burst is registered.
    assert not core.forwarded([(8, 4096, 4096, sinks[1]), (7, 8192, 4096, sinks[2])])
    assert 8 not in core and len(core) == 1
    # The same cookie twice in one burst: none of it either.
    assert not core.forwarded([(9, 4096, 4096, sinks[1]), (9, 8192, 4096, sinks[2])])
    assert 9 not in core and len(core) == 1
    assert core.forwarded([(8, 4096, 4096, sinks[1]), (9, 8192, 4096, sinks[2])])
    assert len(core) == 3


def test_a_whole_single_chunk_reply_is_passed_through() -> None:
    core = transmission()
    sink = Passing(4096, 65536)
    assert core.forwarded([(3, 4096, 65536, sink)])
    receive(core, data_chunk(3, 4096, 65536) + DATA[:65536])
    assert sink.offered == [(4096, 65536, True, None)]
    assert sink.chunks == [("data", 4096, 65536)]
    assert sink.ended and sink.result is None and len(core) == 0


SPLIT = {
    # Not whole: data then a hole, each a chunk; the general parse passes the data.
    "data then hole": (
        data_chunk(4, 0, 4096, flags=0) + DATA[:4096] + hole_chunk(4, 4096, 4096),
        [(0, 4096, False, None)],
        None,
    ),
    # The chunk claims the wrong offset: received and dropped, the read fails.
    "a chunk outside the request": (data_chunk(4, 8192, 4096) + DATA[:4096], [], "outside"),
    # A chunk covering half, ending the reply: passed as the last, with the error.
    "half, then done": (
        data_chunk(4, 0, 4096) + DATA[:4096],
        [(0, 4096, True, "covered")],
        "covered",
    ),
}


@pytest.mark.parametrize(("reply", "offered", "error"), SPLIT.values(), ids=list(SPLIT))
def test_other_replies_to_a_forwarded_read_take_the_general_path(
    reply: bytes, offered: list[tuple[int, int, bool, str | None]], error: str | None
) -> None:
    core = transmission()
    sink = Passing(0, 8192)
    assert core.forwarded([(4, 0, 8192, sink)])
    receive(core, reply)
    assert [(o, n, last, e if e is None else "covered") for o, n, last, e in sink.offered] == [
        (o, n, last, e) for o, n, last, e in offered
    ]
    assert len(core) == 0 and sink.ended
    if error is None:
        assert sink.result is None
    else:
        assert sink.result is not None and error in str(sink.result)


class Verbatim(Passing):
    """A sink that takes whole replies verbatim (and payloads passed through)."""

    def __init__(self, offset: int, length: int, cookie: int) -> None:
        super().__init__(offset, length)
        self.cookie = cookie
        self.verbatim: list[tuple[int, int]] = []

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        if cookie != self.cookie:
            return False
        self.verbatim.append((offset, length))
        return True


def verbatim_transmission() -> Transmission:
    core = transmission()
    core.verbatim = True
    return core


def test_a_peeked_whole_reply_is_moved_with_its_header() -> None:
    core = verbatim_transmission()
    sink = Verbatim(4096, 65536, cookie=3)
    assert core.forwarded([(3, 4096, 65536, sink)])
    assert core.peeked(data_chunk(3, 4096, 65536))
    assert core.passing == 28 + 65536 and sink.verbatim == [(4096, 65536)]
    core.passed(1000)
    assert not sink.ended
    core.passed(28 + 65536 - 1000)
    assert sink.chunks == [("data", 4096, 65536)] and sink.offered == []
    assert sink.ended and sink.result is None and len(core) == 0


PEEKED_NOT_WHOLE = {
    "not done": data_chunk(3, 0, 8192, flags=0),
    "short": data_chunk(3, 0, 4096),
    "elsewhere": data_chunk(3, 4096, 8192),
    "another cookie": data_chunk(4, 0, 8192),
    "a hole": hole_chunk(3, 0, 8192)[:28],
    "bad magic": b"\0" * 28,
}


@pytest.mark.parametrize("head", PEEKED_NOT_WHOLE.values(), ids=list(PEEKED_NOT_WHOLE))
def test_anything_but_a_whole_reply_is_left_to_the_parse(head: bytes) -> None:
    core = verbatim_transmission()
    sink = Verbatim(0, 8192, cookie=3)
    assert core.forwarded([(3, 0, 8192, sink)])
    assert not core.peeked(head)
    assert core.passing == 0 and sink.verbatim == [] and 3 in core
    # The general parse still reads the real reply as before.
    receive(core, data_chunk(3, 0, 8192) + DATA[:8192])
    assert sink.ended and sink.result is None


def test_a_sink_that_refuses_leaves_the_reply_to_the_parse() -> None:
    core = verbatim_transmission()
    sink = Verbatim(0, 8192, cookie=99)  # its client's cookie is not the upstream one
    assert core.forwarded([(3, 0, 8192, sink)])
    assert not core.peeked(data_chunk(3, 0, 8192))
    receive(core, data_chunk(3, 0, 8192) + DATA[:8192])
    assert sink.offered == [(0, 8192, True, None)] and sink.ended and sink.result is None


def test_nothing_is_peeked_while_bytes_are_staged() -> None:
    core = verbatim_transmission()
    sink = Verbatim(0, 8192, cookie=3)
    assert core.forwarded([(3, 0, 8192, sink)])
    head = data_chunk(3, 0, 8192)
    buffer = core.get_buffer()
    buffer[:10] = head[:10]
    core.buffer_updated(10)
    assert not core.peeked(head)
    receive(core, head[10:] + DATA[:8192])
    assert sink.ended and sink.result is None and sink.verbatim == []


def test_reads_in_flight_are_counted_for_the_io_layer() -> None:
    """The I/O layer peeks only while READs are in flight (a restore's WRITE replies are
    never whole data chunks)."""
    core = verbatim_transmission()
    sink = Verbatim(0, 8192, cookie=3)
    core.request(1, Command.WRITE, 0, 0, 4096, Passing(0, 0))
    assert core.reads == 0
    core.request(2, Command.READ, 0, 8192, 8192, Passing(8192, 8192))
    assert core.forwarded([(3, 0, 8192, sink)])
    assert core.reads == 2
    receive(core, data_chunk(3, 0, 8192) + DATA[:8192])
    assert core.reads == 1
    core.fail_all(ReplyError(5, "gone"))
    assert core.reads == 0
