"""The client side of NBD without I/O: builders for what a client sends, parsers for what a
server answers. The asyncio client in nbdsrv.net.client drives these."""

from collections.abc import Sequence
from dataclasses import dataclass

from . import wire
from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    HandshakeFlag,
    ReplyType,
)
from .errors import ProtocolError
from .extents import Extent


def parse_greeting(data: bytes) -> HandshakeFlag:
    """The 18-byte newstyle greeting → the server's handshake flags."""
    magic, opt_magic, flags = wire.GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ProtocolError("not a newstyle NBD server")
    if not flags & HandshakeFlag.FIXED_NEWSTYLE:
        raise ProtocolError("server does not support fixed newstyle negotiation")
    return HandshakeFlag(flags)


def option(option: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def info_go_data(export: str, infos: Sequence[int]) -> bytes:
    name = export.encode()
    return (
        wire.UINT32.pack(len(name))
        + name
        + wire.UINT16.pack(len(infos))
        + b"".join(wire.UINT16.pack(i) for i in infos)
    )


def meta_context_data(export: str, queries: Sequence[str]) -> bytes:
    name = export.encode()
    parts = [wire.UINT32.pack(len(name)), name, wire.UINT32.pack(len(queries))]
    for query in queries:
        encoded = query.encode()
        parts += [wire.UINT32.pack(len(encoded)), encoded]
    return b"".join(parts)


@dataclass(frozen=True)
class OptionReply:
    option: int
    reply: int
    length: int


def parse_option_reply(data: bytes) -> OptionReply:
    magic, opt, reply, length = wire.OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic 0x{magic:x}")
    return OptionReply(opt, reply, length)


def request(
    cookie: int, command: int, flags: int, offset: int, length: int, *, extended: bool
) -> bytes:
    if extended:
        return wire.EXTENDED_REQUEST.pack(
            EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
        )
    return wire.REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


@dataclass(frozen=True)
class ReplyHeader:
    """A simple reply (``simple``; ``error`` set) or a structured/extended chunk header."""

    simple: bool
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = 0
    length: int = 0


def reply_header_size(*, extended: bool) -> int:
    """Bytes to read before the magic tells which header this is (compact: 4 + rest)."""
    return wire.EXTENDED_REPLY.size if extended else 4


def parse_reply_magic(data: bytes) -> int:
    (magic,) = wire.UINT32.unpack_from(data, 0)
    return int(magic)


def parse_simple_reply(data: bytes) -> ReplyHeader:
    magic, error, cookie = wire.SIMPLE_REPLY.unpack(data)
    assert magic == SIMPLE_REPLY_MAGIC
    return ReplyHeader(True, cookie, error=error)


def parse_structured_reply(data: bytes) -> ReplyHeader:
    magic, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic 0x{magic:x}")
    return ReplyHeader(False, cookie, flags=flags, type=rtype, length=length)


def parse_extended_reply(data: bytes) -> ReplyHeader:
    magic, flags, rtype, cookie, _offset, length = wire.EXTENDED_REPLY.unpack(data)
    if magic != EXTENDED_REPLY_MAGIC:
        raise ProtocolError(f"bad extended reply magic 0x{magic:x}")
    return ReplyHeader(False, cookie, flags=flags, type=rtype, length=length)


def parse_error_chunk(payload: bytes) -> tuple[int, str]:
    if len(payload) < wire.ERROR_CHUNK.size:
        raise ProtocolError("error chunk too short")
    error, msg_len = wire.ERROR_CHUNK.unpack_from(payload, 0)
    message = payload[wire.ERROR_CHUNK.size : wire.ERROR_CHUNK.size + msg_len]
    return error, message.decode("utf-8", "replace")


def parse_block_status(rtype: int, payload: bytes) -> tuple[int, list[Extent]]:
    """A BLOCK_STATUS or BLOCK_STATUS_EXT payload → (context id, extents)."""
    if rtype == ReplyType.BLOCK_STATUS:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise ProtocolError(f"bad block status payload length {len(payload)}")
        (context_id,) = wire.BLOCK_STATUS_HEADER.unpack_from(payload, 0)
        extents = list(wire.EXTENT.iter_unpack(payload[4:]))
        return context_id, extents
    if len(payload) < 24 or (len(payload) - 8) % 16:
        raise ProtocolError(f"bad extended block status payload length {len(payload)}")
    context_id, count = wire.BLOCK_STATUS_EXT_HEADER.unpack_from(payload, 0)
    extents = list(wire.EXTENT_EXT.iter_unpack(payload[8:]))
    if count != len(extents):
        raise ProtocolError("block status descriptor count does not match its length")
    return context_id, extents
