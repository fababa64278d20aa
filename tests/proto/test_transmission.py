"""Byte-level tables for the transmission phase: requests in, replies out.

Expected replies are built with the layouts in spec.py, not with nbdsrv.proto.wire."""

import struct

import pytest

from nbdsrv.proto.constants import Command, CommandFlag, Errno
from nbdsrv.proto.server import Disconnect, Phase, Request, ServerConnection

from . import spec
from .driver import DISK_SIZE, FakeCatalog, FakeExport, feed, negotiate

MIB32 = 32 * 1024 * 1024
BIG = FakeExport("big", "", 1 << 30, ("base:allocation",))
MODES = {
    "simple": {"structured": False},
    "structured": {"structured": True},
    "extended": {"extended": True},
}


def conn_in(mode: str, **kwargs: object) -> ServerConnection:
    return negotiate(**MODES[mode], **kwargs)  # type: ignore[arg-type]


def req(conn: ServerConnection, *args: int, payload: bytes = b"") -> bytes:
    """A request in the header format the connection negotiated."""
    make = spec.ext_request if conn.extended else spec.request
    return make(*args, payload=payload)


def one_request(conn: ServerConnection, data: bytes) -> Request:
    out = feed(conn, [data])
    assert (out.output, out.error) == (b"", None)
    (event,) = out.events
    assert isinstance(event, Request)
    return event


def join(buffers: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def error_of(conn: ServerConnection, output: bytes, cookie: int) -> int:
    """The error value of the single reply in ``output``; checks its framing."""
    (reply,) = spec.parse_replies(output)
    assert reply.cookie == cookie
    if conn.extended:
        assert (reply.kind, reply.type, reply.flags) == ("ext", spec.TYPE_ERROR, 1)
    elif conn.structured:
        assert (reply.kind, reply.type, reply.flags) == ("chunk", spec.TYPE_ERROR, 1)
    else:
        assert reply.kind == "simple"
        return reply.error
    error, message = spec.parse_error_chunk(reply.payload)
    assert message and len(reply.payload) <= 1000  # QEMU drops longer error chunks
    return error


# -- READ ------------------------------------------------------------------------------------


def test_read_gets_a_simple_reply_with_the_data() -> None:
    conn = negotiate(structured=False)
    request = one_request(conn, spec.request(spec.CMD_READ, 7, 4096, 8))
    assert request == Request(7, Command.READ, CommandFlag(0), 4096, 8)
    reply = join(conn.read_reply(request, [(4096, 4, b"abcd"), (4100, 4, None)]))
    assert reply == spec.simple_reply(0, 7, b"abcd\0\0\0\0")


D = b"d" * 4096
SEGMENTS_DHD = [(0, 4096, D), (4096, 8192, None), (12288, 4096, D)]


@pytest.mark.parametrize(
    ("flags", "segments", "chunks"),
    [
        (0, [(0, 16384, b"x" * 16384)], [(1, spec.TYPE_OFFSET_DATA, spec.u64(0) + b"x" * 16384)]),
        (0, [(0, 16384, None)], [(1, spec.TYPE_OFFSET_HOLE, spec.u64(0) + spec.u32(16384))]),
        (
            0,
            SEGMENTS_DHD,
            [
                (0, spec.TYPE_OFFSET_DATA, spec.u64(0) + D),
                (0, spec.TYPE_OFFSET_HOLE, spec.u64(4096) + spec.u32(8192)),
                (1, spec.TYPE_OFFSET_DATA, spec.u64(12288) + D),
            ],
        ),
        (
            spec.FLAG_DF,
            SEGMENTS_DHD,
            [(1, spec.TYPE_OFFSET_DATA, spec.u64(0) + D + bytes(8192) + D)],
        ),
        (
            spec.FLAG_DF | spec.FLAG_FUA,
            [(0, 16384, None)],
            [(1, spec.TYPE_OFFSET_DATA, spec.u64(0) + bytes(16384))],
        ),
    ],
    ids=["data", "hole", "data-hole-data", "df-one-chunk", "df-hole-as-data"],
)
def test_structured_read_sends_offset_data_and_hole_chunks(
    flags: int, segments: list[tuple[int, int, bytes | None]], chunks: list[tuple[int, int, bytes]]
) -> None:
    conn = negotiate(structured=True)
    request = one_request(conn, spec.request(spec.CMD_READ, 9, 0, 16384, flags))
    expected = b"".join(spec.chunk(f, t, 9, p) for f, t, p in chunks)
    assert join(conn.read_reply(request, segments)) == expected


def test_extended_read_sends_extended_chunks_carrying_the_request_offset() -> None:
    conn = negotiate(extended=True)
    request = one_request(conn, spec.ext_request(spec.CMD_READ, 3, 8192, 8192))
    reply = join(conn.read_reply(request, [(8192, 4096, D), (12288, 4096, None)]))
    assert reply == spec.ext_chunk(
        0, spec.TYPE_OFFSET_DATA, 3, 8192, spec.u64(8192) + D
    ) + spec.ext_chunk(1, spec.TYPE_OFFSET_HOLE, 3, 8192, spec.u64(12288) + spec.u32(4096))


@pytest.mark.parametrize("flags", [0, spec.FLAG_DF])
def test_zero_length_structured_read_is_a_lone_none_chunk(flags: int) -> None:
    # OFFSET_DATA needs at least one byte of data (length >= 9), so nothing is sent but DONE.
    conn = negotiate(structured=True)
    request = one_request(conn, spec.request(spec.CMD_READ, 5, 0, 0, flags))
    assert join(conn.read_reply(request, [])) == spec.chunk(1, spec.TYPE_NONE, 5, b"")


def test_read_of_the_last_byte_is_in_range() -> None:
    conn = negotiate(structured=False)
    request = one_request(conn, spec.request(spec.CMD_READ, 1, DISK_SIZE - 1, 1))
    assert (request.offset, request.length) == (DISK_SIZE - 1, 1)


@pytest.mark.parametrize(
    ("mode", "flags", "expected"),
    [
        ("simple", 0, spec.EINVAL),
        ("structured", 0, spec.EINVAL),
        ("extended", 0, spec.EINVAL),
        ("structured", spec.FLAG_DF, spec.EOVERFLOW),  # DF exists only with structured replies
        ("extended", spec.FLAG_DF, spec.EOVERFLOW),
    ],
)
def test_read_over_32_mib_is_refused(mode: str, flags: int, expected: int) -> None:
    conn = conn_in(mode, export="big", catalog=FakeCatalog(BIG))
    out = feed(conn, [req(conn, spec.CMD_READ, 4, 0, MIB32 + 1, flags)])
    assert out.events == []
    assert error_of(conn, out.output, 4) == expected


def test_read_of_exactly_32_mib_is_served() -> None:
    conn = negotiate(structured=True, export="big", catalog=FakeCatalog(BIG))
    assert one_request(conn, spec.request(spec.CMD_READ, 4, 0, MIB32)).length == MIB32


# -- out of range, unknown commands and flags ------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("cmd", "offset", "length"),
    [
        (spec.CMD_READ, DISK_SIZE, 1),
        (spec.CMD_READ, DISK_SIZE - 1, 2),
        (spec.CMD_READ, DISK_SIZE + 1, 0),
        (spec.CMD_READ, (1 << 64) - 1, 1),
        (spec.CMD_CACHE, DISK_SIZE, 4096),
        (spec.CMD_BLOCK_STATUS, DISK_SIZE, 1),
        (spec.CMD_BLOCK_STATUS, 0, DISK_SIZE + 1),
    ],
    ids=[
        "read-at-end",
        "read-across-end",
        "read-past-end",
        "read-max-offset",
        "cache",
        "bs",
        "bs-long",
    ],
)
def test_request_out_of_range_is_einval(mode: str, cmd: int, offset: int, length: int) -> None:
    conn = conn_in(mode)
    out = feed(conn, [req(conn, cmd, 11, offset, length)])
    assert out.events == []
    assert error_of(conn, out.output, 11) == spec.EINVAL


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cmd", [8, 9, 100, 0xFFFF])
def test_unknown_command_is_einval_and_the_connection_goes_on(mode: str, cmd: int) -> None:
    conn = conn_in(mode)
    out = feed(conn, [req(conn, cmd, 12, 0, 512) + req(conn, spec.CMD_READ, 13, 0, 512)])
    assert error_of(conn, out.output, 12) == spec.EINVAL
    assert [e.cookie for e in out.events if isinstance(e, Request)] == [13]


@pytest.mark.parametrize("mode", ["structured", "extended"])
@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (spec.CMD_READ, spec.FLAG_REQ_ONE),
        (spec.CMD_READ, spec.FLAG_NO_HOLE),
        (spec.CMD_READ, 0x40),
        (spec.CMD_READ, 0x8000),
        (spec.CMD_READ, spec.FLAG_PAYLOAD_LEN),
        (spec.CMD_BLOCK_STATUS, spec.FLAG_DF),
        (spec.CMD_BLOCK_STATUS, 0x100),
        (spec.CMD_FLUSH, spec.FLAG_DF),
        (spec.CMD_CACHE, spec.FLAG_REQ_ONE),
        (spec.CMD_CACHE, 0x80),
    ],
)
def test_command_with_a_flag_it_cannot_carry_is_einval(mode: str, cmd: int, flags: int) -> None:
    conn = conn_in(mode)
    # With extended headers PAYLOAD_LEN announces a payload, which must then follow.
    payload = bytes(512) if conn.extended and flags & spec.FLAG_PAYLOAD_LEN else b""
    out = feed(conn, [req(conn, cmd, 14, 0, 512, flags, payload=payload)])
    assert out.events == []
    assert error_of(conn, out.output, 14) == spec.EINVAL


@pytest.mark.parametrize("flags", [spec.FLAG_DF, 0x8000, 0x40])
def test_simple_read_with_unknown_or_unnegotiated_flags_is_einval(flags: int) -> None:
    conn = negotiate(structured=False)
    out = feed(conn, [spec.request(spec.CMD_READ, 15, 0, 512, flags)])
    assert (out.events, out.output) == ([], spec.simple_reply(spec.EINVAL, 15))


def test_fua_is_tolerated_on_reads() -> None:
    conn = negotiate(structured=False)
    assert one_request(conn, spec.request(spec.CMD_READ, 1, 0, 512, spec.FLAG_FUA)).length == 512


# -- FLUSH, CACHE, DISC and bad magic --------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("simple", spec.simple_reply(0, 21)),
        ("structured", spec.simple_reply(0, 21)),
        ("extended", spec.ext_chunk(1, spec.TYPE_NONE, 21, 0, b"")),
    ],
)
def test_flush_succeeds_without_an_event(mode: str, expected: bytes) -> None:
    conn = conn_in(mode)
    out = feed(conn, [req(conn, spec.CMD_FLUSH, 21, 0, 0)])
    assert (out.events, out.output) == ([], expected)


def test_cache_is_passed_on_and_answered_with_ok_reply() -> None:
    conn = negotiate(structured=False)
    request = one_request(conn, spec.request(spec.CMD_CACHE, 22, 0, 4096))
    assert request.command == Command.CACHE
    assert conn.ok_reply(request) == spec.simple_reply(0, 22)


@pytest.mark.parametrize("mode", list(MODES))
def test_disc_disconnects_silently_and_ignores_what_follows(mode: str) -> None:
    conn = conn_in(mode)
    out = feed(conn, [req(conn, spec.CMD_DISC, 23, 0, 0) + req(conn, spec.CMD_READ, 24, 0, 1)])
    assert (out.events, out.output) == ([Disconnect("client sent NBD_CMD_DISC")], b"")
    assert conn.phase is Phase.CLOSED
    assert feed(conn, [req(conn, spec.CMD_READ, 25, 0, 1)]).events == []


@pytest.mark.parametrize(
    ("mode", "magic"),
    [
        ("simple", 0x25609514),
        ("simple", spec.EXTENDED_REQUEST_MAGIC),
        ("structured", 0),
        ("extended", spec.REQUEST_MAGIC),
    ],
)
def test_bad_request_magic_is_a_protocol_error(mode: str, magic: int) -> None:
    conn = conn_in(mode)
    header = struct.pack(">IHHQQQ", magic, 0, 0, 1, 0, 512)
    assert feed(conn, [header]).error is not None


# -- writes on a read-only export --------------------------------------------------------------


def write(conn: ServerConnection, cookie: int, payload: bytes) -> bytes:
    flags = spec.FLAG_PAYLOAD_LEN if conn.extended else 0
    return req(conn, spec.CMD_WRITE, cookie, 0, len(payload), flags, payload=payload)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (spec.CMD_TRIM, 0),
        (spec.CMD_WRITE_ZEROES, 0),
        (spec.CMD_WRITE_ZEROES, spec.FLAG_NO_HOLE | spec.FLAG_FAST_ZERO),
        (spec.CMD_TRIM, DISK_SIZE),  # EPERM wins over the bad flags and the range
    ],
)
def test_trim_and_write_zeroes_are_eperm(mode: str, cmd: int, flags: int) -> None:
    conn = conn_in(mode)
    out = feed(conn, [req(conn, cmd, 31, 0, 4096, flags & 0xFFFF)])
    assert out.events == []
    assert error_of(conn, out.output, 31) == spec.EPERM


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", [1, 4096, 100_000])
def test_write_is_eperm_and_its_payload_is_drained(mode: str, size: int) -> None:
    conn = conn_in(mode)
    payload = bytes(range(256)) * (size // 256) + b"\x25" * (size % 256)
    out = feed(conn, [write(conn, 32, payload) + req(conn, spec.CMD_READ, 33, 0, 512)])
    assert error_of(conn, out.output, 32) == spec.EPERM
    assert [e.cookie for e in out.events if isinstance(e, Request)] == [33]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
def test_write_payload_split_across_many_receive_calls_is_drained(mode: str, piece: int) -> None:
    conn = conn_in(mode)
    # The payload looks like a request, so misparsing it would show.
    payload = req(conn, spec.CMD_READ, 666, 0, 512) * 40
    data = write(conn, 34, payload) + req(conn, spec.CMD_READ, 35, 0, 512)
    out = feed(conn, [data[i : i + piece] for i in range(0, len(data), piece)])
    assert error_of(conn, out.output, 34) == spec.EPERM
    assert [e.cookie for e in out.events if isinstance(e, Request)] == [35]


def test_unexpected_payload_in_extended_mode_is_drained_then_einval() -> None:
    conn = negotiate(extended=True)
    data = spec.ext_request(spec.CMD_READ, 36, 0, 10, spec.FLAG_PAYLOAD_LEN, payload=b"x" * 10)
    out = feed(conn, [data + spec.ext_request(spec.CMD_FLUSH, 37, 0, 0)])
    first, second = spec.parse_replies(out.output)
    assert (first.cookie, spec.parse_error_chunk(first.payload)[0]) == (36, spec.EINVAL)
    assert (second.cookie, second.type) == (37, spec.TYPE_NONE)


# -- BLOCK_STATUS --------------------------------------------------------------------------------


def bs_payload(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    return spec.u32(context_id) + b"".join(spec.u32(n) + spec.u32(f) for n, f in extents)


def test_block_status_sends_one_chunk_per_context_done_on_the_last() -> None:
    conn = negotiate(queries=("base:allocation", "qemu:dirty-bitmap:b0"))
    request = one_request(conn, spec.request(spec.CMD_BLOCK_STATUS, 41, 0, 65536))
    reply = conn.block_status_reply(request, [(0, [(4096, 3), (61440, 0)]), (2, [(65536, 1)])])
    assert reply == spec.chunk(
        0, spec.TYPE_BLOCK_STATUS, 41, bs_payload(0, [(4096, 3), (61440, 0)])
    ) + spec.chunk(1, spec.TYPE_BLOCK_STATUS, 41, bs_payload(2, [(65536, 1)]))


@pytest.mark.parametrize(
    ("flags", "length", "source", "expected"),
    [
        (0, 4096, [(1024, 0), (1024, 0), (2048, 3)], [(2048, 0), (2048, 3)]),
        (0, 4096, [(1024, 0), (0, 1), (3072, 0)], [(4096, 0)]),
        (0, 4096, [(1024, 3), (1 << 20, 0)], [(1024, 3), (3072, 0)]),
        (0, 4096, [(512, 0)], [(512, 0)]),
        (spec.FLAG_REQ_ONE, 4096, [(1 << 20, 0)], [(4096, 0)]),
        (spec.FLAG_REQ_ONE, 4096, [(512, 3), (512, 0)], [(512, 3)]),
        (spec.FLAG_REQ_ONE, 4096, [(512, 3), (512, 3), (8192, 0)], [(1024, 3)]),
    ],
    ids=[
        "coalesces-equal-neighbours",
        "drops-empty-extents",
        "clips-to-request",
        "short-answer-allowed",
        "req-one-clipped",
        "req-one-first-only",
        "req-one-merged-first",
    ],
)
def test_block_status_extents_are_clipped_merged_and_req_one_gives_one(
    flags: int, length: int, source: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    conn = negotiate()
    request = one_request(conn, spec.request(spec.CMD_BLOCK_STATUS, 42, 0, length, flags))
    reply = conn.block_status_reply(request, [(0, source)])
    assert reply == spec.chunk(1, spec.TYPE_BLOCK_STATUS, 42, bs_payload(0, expected))


def test_block_status_caps_a_reply_at_131072_extents() -> None:
    conn = negotiate()
    request = one_request(conn, spec.request(spec.CMD_BLOCK_STATUS, 43, 0, DISK_SIZE))
    source = [(1, i % 2) for i in range(200_000)]
    (chunk,) = spec.parse_replies(conn.block_status_reply(request, [(0, source)]))
    context_id, extents = spec.parse_extents(chunk.payload)
    assert (context_id, len(extents), extents[:2]) == (0, 131072, [(1, 0), (1, 1)])


def test_block_status_caps_a_compact_extent_at_4_gib() -> None:
    huge = FakeExport("huge", "", 1 << 40, ("base:allocation",))
    conn = negotiate(export="huge", catalog=FakeCatalog(huge))
    request = one_request(conn, spec.request(spec.CMD_BLOCK_STATUS, 44, 0, 0xFFFFFFFF))
    (chunk,) = spec.parse_replies(conn.block_status_reply(request, [(0, [(1 << 40, 3)])]))
    assert spec.parse_extents(chunk.payload)[1] == [(0xFFFFFFFF, 3)]


def test_extended_block_status_uses_64_bit_descriptors() -> None:
    huge = FakeExport("huge", "", 1 << 40, ("base:allocation",))
    conn = negotiate(extended=True, export="huge", catalog=FakeCatalog(huge))
    request = one_request(conn, spec.ext_request(spec.CMD_BLOCK_STATUS, 45, 4096, 1 << 36))
    reply = conn.block_status_reply(request, [(0, [(1 << 35, 0), (1 << 37, 3)])])
    payload = spec.u32(0) + spec.u32(2) + spec.u64(1 << 35) + spec.u64(0)
    payload += spec.u64(1 << 35) + spec.u64(3)
    assert reply == spec.ext_chunk(1, spec.TYPE_BLOCK_STATUS_EXT, 45, 4096, payload)


@pytest.mark.parametrize("mode", list(MODES))
def test_block_status_without_contexts_is_einval(mode: str) -> None:
    conn = conn_in(mode, queries=())
    out = feed(conn, [req(conn, spec.CMD_BLOCK_STATUS, 46, 0, 4096)])
    assert out.events == []
    assert error_of(conn, out.output, 46) == spec.EINVAL


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_block_status_of_zero_length_is_einval(mode: str) -> None:
    conn = conn_in(mode)
    out = feed(conn, [req(conn, spec.CMD_BLOCK_STATUS, 47, 0, 0)])
    assert out.events == []
    assert error_of(conn, out.output, 47) == spec.EINVAL


# -- reply builders -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("simple", spec.simple_reply(5, 48)),
        ("structured", spec.chunk(1, spec.TYPE_ERROR, 48, spec.u32(5) + spec.u16(4) + b"oops")),
        (
            "extended",
            spec.ext_chunk(1, spec.TYPE_ERROR, 48, 512, spec.u32(5) + spec.u16(4) + b"oops"),
        ),
    ],
)
def test_error_reply_layout(mode: str, expected: bytes) -> None:
    conn = conn_in(mode)
    request = one_request(conn, req(conn, spec.CMD_READ, 48, 512, 512))
    assert conn.error_reply(request, Errno.EIO, "oops") == expected


def test_error_reply_message_is_cut_short_for_qemu() -> None:
    conn = negotiate()
    request = one_request(conn, spec.request(spec.CMD_READ, 49, 0, 512))
    (chunk,) = spec.parse_replies(conn.error_reply(request, Errno.EIO, "x" * 5000))
    assert len(chunk.payload) <= 1000
    assert spec.parse_error_chunk(chunk.payload)[0] == 5


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("simple", spec.simple_reply(0, 50)),
        ("structured", spec.simple_reply(0, 50)),
        ("extended", spec.ext_chunk(1, spec.TYPE_NONE, 50, 4096, b"")),
    ],
)
def test_ok_reply_layout(mode: str, expected: bytes) -> None:
    conn = conn_in(mode)
    request = one_request(conn, req(conn, spec.CMD_CACHE, 50, 4096, 512))
    assert conn.ok_reply(request) == expected
