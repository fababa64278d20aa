"""An asyncio NBD client on the protocol core: the upstream link to QEMU's exports, and a
client for tests. Many requests may be in flight; replies are matched by cookie.

    client = await NBDClient.connect(address, "disk0", contexts=["base:allocation"])
    data = await client.read(0, 65536)
    extents = await client.block_status(0, client.size)   # {context name: [(length, flags)]}
    await client.close()
"""

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..proto import client as proto
from ..proto import wire
from ..proto.constants import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from ..proto.errors import NBDError, ProtocolError, ReplyError
from ..proto.extents import Extent
from .address import Address

MAX_OPTION_REPLY = 64 * 1024 * 1024


class ConnectionClosed(NBDError):
    """The connection ended while requests were in flight."""


@dataclass
class _Pending:
    command: Command
    offset: int
    length: int
    future: "asyncio.Future[object]"
    # A READ's data: the one chunk's payload as it came (no copy) when a single chunk covers
    # the request, else a zeroed buffer the chunks are copied into.
    data: bytes | bytearray | memoryview | None = None
    extents: dict[int, list[Extent]] = field(default_factory=dict)
    error: ReplyError | None = None


def _buffer(pending: _Pending) -> bytearray:
    """The request's zeroed buffer, holding whatever chunk arrived before."""
    if not isinstance(pending.data, bytearray):
        buffer = bytearray(pending.length)
        if pending.data is not None:
            buffer[: len(pending.data)] = pending.data
        pending.data = buffer
    return pending.data


async def _open(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    limit = 64 * 1024 * 1024
    if address.kind == "unix":
        return await asyncio.open_unix_connection(address.path, limit=limit)
    reader, writer = await asyncio.open_connection(address.host, address.port, limit=limit)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


class _Handshake:
    """Option haggling on an open stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def greet(self) -> None:
        flags = proto.parse_greeting(await self.reader.readexactly(wire.GREETING.size))
        client_flags = ClientFlag.C_FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client_flags |= ClientFlag.C_NO_ZEROES
        self.writer.write(wire.CLIENT_FLAGS.pack(client_flags))

    async def send(self, option: Option, data: bytes = b"") -> None:
        self.writer.write(proto.option(option, data))
        await self.writer.drain()

    async def reply(self, option: Option) -> tuple[int, bytes]:
        header = proto.parse_option_reply(await self.reader.readexactly(20))
        if header.option != option:
            raise ProtocolError(f"reply to option {header.option}, expected {option}")
        if header.length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {header.length} bytes")
        payload = await self.reader.readexactly(header.length)
        if header.reply & (1 << 31):
            message = payload.decode("utf-8", "replace") or Reply(header.reply).name
            raise ReplyError(header.reply, message)
        return header.reply, payload

    async def simple_option(self, option: Option) -> bool:
        """Send a data-less option; True on ACK, False on an error reply."""
        await self.send(option)
        try:
            await self.reply(option)
        except ReplyError:
            return False
        return True


class NBDClient:
    """A connection in transmission phase on one export."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        export: str,
        size: int,
        flags: TransmissionFlag,
        structured: bool,
        extended: bool,
        contexts: dict[int, str],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.export = export
        self.size = size
        self.flags = flags
        self.structured = structured
        self.extended = extended
        self.contexts = contexts
        self._pending: dict[int, _Pending] = {}
        self._cookies = itertools.count(1)
        self._closed: BaseException | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def connect(
        cls,
        address: Address,
        export: str = "",
        *,
        contexts: Sequence[str] = (),
        structured: bool = True,
        extended: bool = True,
    ) -> "NBDClient":
        reader, writer = await _open(address)
        try:
            hs = _Handshake(reader, writer)
            await hs.greet()
            is_extended = extended and await hs.simple_option(Option.EXTENDED_HEADERS)
            is_structured = is_extended or (
                structured and await hs.simple_option(Option.STRUCTURED_REPLY)
            )
            selected: dict[int, str] = {}
            if contexts and is_structured:
                await hs.send(
                    Option.SET_META_CONTEXT, proto.meta_context_data(export, list(contexts))
                )
                while True:
                    reply, payload = await hs.reply(Option.SET_META_CONTEXT)
                    if reply == Reply.ACK:
                        break
                    (context_id,) = wire.UINT32.unpack_from(payload, 0)
                    selected[context_id] = payload[4:].decode()
            await hs.send(Option.GO, proto.info_go_data(export, [Info.BLOCK_SIZE]))
            size, flags = -1, TransmissionFlag(0)
            while True:
                reply, payload = await hs.reply(Option.GO)
                if reply == Reply.ACK:
                    break
                if reply == Reply.INFO and wire.UINT16.unpack_from(payload, 0)[0] == Info.EXPORT:
                    _, size, raw_flags = wire.INFO_EXPORT.unpack(payload)
                    flags = TransmissionFlag(raw_flags)
            if size < 0:
                raise ProtocolError("server sent no NBD_INFO_EXPORT")
        except BaseException:
            writer.close()
            raise
        return cls(
            reader,
            writer,
            export=export,
            size=size,
            flags=flags,
            structured=is_structured,
            extended=is_extended,
            contexts=selected,
        )

    @staticmethod
    async def list_exports(address: Address) -> list[tuple[str, str]]:
        """``(name, description)`` of every export, by NBD_OPT_LIST."""
        reader, writer = await _open(address)
        try:
            hs = _Handshake(reader, writer)
            await hs.greet()
            await hs.send(Option.LIST)
            out = []
            while True:
                reply, payload = await hs.reply(Option.LIST)
                if reply == Reply.ACK:
                    break
                (name_len,) = wire.UINT32.unpack_from(payload, 0)
                name = payload[4 : 4 + name_len].decode()
                out.append((name, payload[4 + name_len :].decode()))
            await hs.send(Option.ABORT)
            with contextlib.suppress(ReplyError, asyncio.IncompleteReadError, ConnectionError):
                await hs.reply(Option.ABORT)
            return out
        finally:
            writer.close()

    # -- requests -------------------------------------------------------------------------

    def _submit(self, command: Command, flags: int, offset: int, length: int) -> _Pending:
        if self._closed is not None:
            raise ConnectionClosed(f"connection closed: {self._closed}")
        cookie = next(self._cookies)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        pending = _Pending(command, offset, length, future)
        self._pending[cookie] = pending
        self._writer.write(
            proto.request(cookie, command, flags, offset, length, extended=self.extended)
        )
        return pending

    async def read(
        self, offset: int, length: int, *, flags: int = 0
    ) -> bytes | bytearray | memoryview:
        pending = self._submit(Command.READ, flags, offset, length)
        await pending.future
        return pending.data if pending.data is not None else bytes(length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        flags = CommandFlag.REQ_ONE if req_one else 0
        pending = self._submit(Command.BLOCK_STATUS, flags, offset, length)
        await pending.future
        return {self.contexts.get(cid, str(cid)): ext for cid, ext in pending.extents.items()}

    async def flush(self) -> None:
        await self._submit(Command.FLUSH, 0, 0, 0).future

    async def request(self, command: int, flags: int, offset: int, length: int) -> None:
        """Any payload-less request, for tests that probe error handling."""
        await self._submit(Command(command), flags, offset, length).future

    async def close(self) -> None:
        """NBD_CMD_DISC after outstanding requests, then close."""
        if self._closed is None:
            if self._pending:
                await asyncio.gather(
                    *(p.future for p in self._pending.values()), return_exceptions=True
                )
            with contextlib.suppress(ConnectionError):
                self._writer.write(proto.request(0, Command.DISC, 0, 0, 0, extended=self.extended))
            self._closed = ConnectionClosed("closed by client")
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    # -- replies --------------------------------------------------------------------------

    async def _read_replies(self) -> None:
        try:
            while True:
                await self._read_one()
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
            self._fail_all(e)
        except Exception as e:  # a bug must not leave callers waiting forever
            self._fail_all(e)
            raise

    def _fail_all(self, error: BaseException) -> None:
        self._closed = error
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionClosed(f"connection lost: {error}"))
        self._pending.clear()

    async def _read_one(self) -> None:
        read = self._reader.readexactly
        if self.extended:
            header = proto.parse_extended_reply(await read(wire.EXTENDED_REPLY.size))
        else:
            head = await read(4)
            magic = proto.parse_reply_magic(head)
            if magic == SIMPLE_REPLY_MAGIC:
                header = proto.parse_simple_reply(head + await read(wire.SIMPLE_REPLY.size - 4))
            elif magic == STRUCTURED_REPLY_MAGIC:
                rest = await read(wire.STRUCTURED_REPLY.size - 4)
                header = proto.parse_structured_reply(head + rest)
            else:
                raise ProtocolError(f"bad reply magic 0x{magic:x}")
        pending = self._pending.get(header.cookie)
        if pending is None:
            raise ProtocolError(f"reply for unknown cookie {header.cookie}")
        if header.simple:
            if header.error:
                pending.error = ReplyError(header.error, f"server error {header.error}")
            elif pending.command == Command.READ:
                pending.data = await read(pending.length)
            self._complete(header.cookie, pending)
            return
        payload = await read(header.length)
        self._chunk(pending, header.type, payload)
        if header.flags & ReplyFlag.DONE:
            self._complete(header.cookie, pending)

    def _chunk(self, pending: _Pending, rtype: int, payload: bytes) -> None:
        if rtype == ReplyType.OFFSET_DATA:
            (offset,) = wire.OFFSET_DATA.unpack_from(payload, 0)
            start = offset - pending.offset
            data = memoryview(payload)[8:]
            if pending.command != Command.READ or start < 0 or start + len(data) > pending.length:
                raise ProtocolError("OFFSET_DATA chunk outside the request")
            if pending.data is None and start == 0 and len(data) == pending.length:
                pending.data = data  # the common case: one chunk, kept as it came
            else:
                _buffer(pending)[start : start + len(data)] = data
        elif rtype == ReplyType.OFFSET_HOLE:
            offset, hole = wire.OFFSET_HOLE.unpack(payload)
            start = offset - pending.offset
            if pending.command != Command.READ or start < 0 or start + hole > pending.length:
                raise ProtocolError("OFFSET_HOLE chunk outside the request")
            _buffer(pending)  # zeroed: a hole needs no copy
        elif rtype in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            context_id, extents = proto.parse_block_status(rtype, payload)
            pending.extents[context_id] = extents
        elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            code, message = proto.parse_error_chunk(payload)
            pending.error = ReplyError(code, message)
        elif rtype != ReplyType.NONE:
            if rtype & 0x8000:
                pending.error = ReplyError(5, f"unknown error chunk type {rtype}")
            else:
                raise ProtocolError(f"unknown reply chunk type {rtype}")

    def _complete(self, cookie: int, pending: _Pending) -> None:
        del self._pending[cookie]
        if pending.future.done():
            return
        if pending.error is not None:
            pending.future.set_exception(pending.error)
        else:
            pending.future.set_result(None)
