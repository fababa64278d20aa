"""NBD wire layouts written from the spec (doc/proto.md), independent of nbdsrv.proto.wire.

The tests build what a client sends and what the server must answer with these, so a
mistake in the server's own layouts cannot hide behind the same mistake in the test.
All integers are big-endian.
"""

import struct
from dataclasses import dataclass

# -- magics and numbers, copied from the spec's tables ------------------------------------
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Options (section "Option types").
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies (section "Option reply types").
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_EXT_HEADER_REQD = 0x8000000A

# NBD_INFO_* (section "NBD_REP_INFO").
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags of a read-only, shareable export that takes flush/FUA/cache as no-ops.
TF_HAS_FLAGS = 0x0001
TF_READ_ONLY = 0x0002
TF_SEND_FLUSH = 0x0004
TF_SEND_FUA = 0x0008
TF_SEND_DF = 0x0080
TF_CAN_MULTI_CONN = 0x0100
TF_SEND_CACHE = 0x0400
EXPORT_FLAGS = (
    TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE
)
EXPORT_FLAGS_STRUCTURED = EXPORT_FLAGS | TF_SEND_DF

# Commands and command flags (sections "Request types", "Command flags").
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
FLAG_FUA = 0x01
FLAG_NO_HOLE = 0x02
FLAG_DF = 0x04
FLAG_REQ_ONE = 0x08
FLAG_FAST_ZERO = 0x10
FLAG_PAYLOAD_LEN = 0x20

# Structured reply flags and types.
REPLY_FLAG_DONE = 0x1
TYPE_NONE = 0
TYPE_OFFSET_DATA = 1
TYPE_OFFSET_HOLE = 2
TYPE_BLOCK_STATUS = 5
TYPE_BLOCK_STATUS_EXT = 6
TYPE_ERROR = 0x8001

# Error values.
EPERM = 1
EINVAL = 22
EOVERFLOW = 75
ESHUTDOWN = 108

# -- layouts -------------------------------------------------------------------------------
# NBDMAGIC(8) IHAVEOPT(8) handshake_flags(2)
L_GREETING = struct.Struct(">8s8sH")
# IHAVEOPT(8) option(4) length(4)
L_OPTION = struct.Struct(">8sII")
# magic(8) option(4) reply_type(4) length(4)
L_OPTION_REPLY = struct.Struct(">8sIII")
# magic(4) flags(2) type(2) cookie(8) offset(8) length(4)
L_REQUEST = struct.Struct(">IHHQQI")
# magic(4) flags(2) type(2) cookie(8) offset(8) length(8)
L_EXT_REQUEST = struct.Struct(">IHHQQQ")
# magic(4) error(4) cookie(8)
L_SIMPLE = struct.Struct(">IIQ")
# magic(4) flags(2) type(2) cookie(8) length(4)
L_CHUNK = struct.Struct(">IHHQI")
# magic(4) flags(2) type(2) cookie(8) offset(8) length(8)
L_EXT_CHUNK = struct.Struct(">IHHQQQ")


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


# -- what a client sends ---------------------------------------------------------------------
def option(opt: int, data: bytes = b"") -> bytes:
    return L_OPTION.pack(IHAVEOPT, opt, len(data)) + data


def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: name_len(4) name info_count(2) info_type(2)*."""
    raw = name.encode()
    return u32(len(raw)) + raw + u16(len(infos)) + b"".join(u16(i) for i in infos)


def meta_data(export: str, queries: tuple[str, ...] = ()) -> bytes:
    """Meta-context option data: export_len(4) export count(4) {query_len(4) query}*."""
    raw = export.encode()
    out = u32(len(raw)) + raw + u32(len(queries))
    for q in queries:
        out += u32(len(q.encode())) + q.encode()
    return out


def request(
    cmd: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
) -> bytes:
    return L_REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def ext_request(
    cmd: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
) -> bytes:
    return L_EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


# -- what the server must send ---------------------------------------------------------------
def greeting() -> bytes:
    # FIXED_NEWSTYLE | NO_ZEROES, as QEMU's server sends.
    return L_GREETING.pack(NBDMAGIC, IHAVEOPT, 0x0003)


def option_reply(opt: int, rtype: int, payload: bytes = b"") -> bytes:
    return L_OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, rtype, len(payload)) + payload


def info_export(size: int, flags: int) -> bytes:
    return u16(INFO_EXPORT) + u64(size) + u16(flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return u16(INFO_BLOCK_SIZE) + u32(minimum) + u32(preferred) + u32(maximum)


def simple_reply(error: int, cookie: int, data: bytes = b"") -> bytes:
    return L_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(flags: int, rtype: int, cookie: int, payload: bytes) -> bytes:
    return L_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, len(payload)) + payload


def ext_chunk(flags: int, rtype: int, cookie: int, offset: int, payload: bytes) -> bytes:
    return (
        L_EXT_CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, rtype, cookie, offset, len(payload)) + payload
    )


# -- parsing what the server sent ------------------------------------------------------------
@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    payload: bytes


def parse_option_replies(data: bytes) -> list[OptionReply]:
    """Split option replies; every byte must belong to one."""
    out: list[OptionReply] = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = L_OPTION_REPLY.unpack_from(data, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += L_OPTION_REPLY.size
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated option reply"
        pos += length
        out.append(OptionReply(opt, rtype, payload))
    return out


@dataclass(frozen=True)
class Reply:
    """One simple reply or one (extended) structured chunk."""

    kind: str  # "simple", "chunk" or "ext"
    cookie: int
    error: int = 0  # simple replies
    flags: int = 0  # chunks
    type: int = 0
    offset: int = 0  # extended chunks
    payload: bytes = b""


def parse_replies(data: bytes, read_lengths: dict[int, int] | None = None) -> list[Reply]:
    """Split transmission output into replies; every byte must belong to one.

    A successful simple reply carries data only for a READ; ``read_lengths`` maps the
    cookies of READs to their lengths."""
    read_lengths = read_lengths or {}
    out: list[Reply] = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = L_SIMPLE.unpack_from(data, pos)
            pos += L_SIMPLE.size
            n = read_lengths.get(cookie, 0) if error == 0 else 0
            out.append(Reply("simple", cookie, error=error, payload=data[pos : pos + n]))
            pos += n
        elif magic == STRUCTURED_REPLY_MAGIC:
            _, flags, rtype, cookie, length = L_CHUNK.unpack_from(data, pos)
            pos += L_CHUNK.size
            out.append(
                Reply("chunk", cookie, flags=flags, type=rtype, payload=data[pos : pos + length])
            )
            pos += length
        elif magic == EXTENDED_REPLY_MAGIC:
            _, flags, rtype, cookie, offset, length = L_EXT_CHUNK.unpack_from(data, pos)
            pos += L_EXT_CHUNK.size
            payload = data[pos : pos + length]
            out.append(
                Reply("ext", cookie, flags=flags, type=rtype, offset=offset, payload=payload)
            )
            pos += length
        else:
            raise AssertionError(f"unknown reply magic 0x{magic:08x} at {pos}")
        assert pos <= len(data), "truncated reply"
    return out


def parse_error_chunk(payload: bytes) -> tuple[int, str]:
    """NBD_REPLY_TYPE_ERROR payload: error(4) message_length(2) message."""
    error, n = struct.unpack_from(">IH", payload)
    assert len(payload) == 6 + n
    return error, payload[6:].decode()


def parse_extents(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """NBD_REPLY_TYPE_BLOCK_STATUS payload: context_id(4) {length(4) flags(4)}+."""
    (context_id,) = struct.unpack_from(">I", payload)
    assert (len(payload) - 4) % 8 == 0 and len(payload) >= 12
    extents = [struct.unpack_from(">II", payload, p) for p in range(4, len(payload), 8)]
    return context_id, extents


def parse_extents_ext(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """NBD_REPLY_TYPE_BLOCK_STATUS_EXT: context_id(4) count(4) {length(8) flags(8)}+."""
    context_id, count = struct.unpack_from(">II", payload)
    assert len(payload) == 8 + 16 * count and count >= 1
    extents = [struct.unpack_from(">QQ", payload, p) for p in range(8, len(payload), 16)]
    return context_id, extents
