"""The client side of NBD without I/O: option sequencing (:class:`Handshake`) and the
transmission phase (:class:`Transmission`), which builds requests and assembles the reply
chunks of every request in flight. The asyncio client in nbdsrv.net.client drives both.

Replies are read straight into their destination: :meth:`Transmission.get_buffer` names the
memory the next received bytes belong in — a small staging area for headers, or the buffer
a request's :class:`ReplySink` gave for a READ payload — so the I/O layer can receive into it
(``BufferedProtocol``) with no copy in between. With ``passthrough`` on, a sink may instead
have the I/O layer move a data payload itself, without reading it (splice to another
socket): :attr:`Transmission.passing` says how many bytes, :meth:`Transmission.passed`
counts them.

A READ succeeds only if its reply covers exactly the requested range, with data and hole
chunks that neither overlap nor stray outside it, and no error chunk; anything else ends the
request with an error (EIO unless the server named one), never with zeroes.
"""

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    ClientFlag,
    Command,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from .errors import ProtocolError, ReplyError
from .extents import Extent

# Longest option reply or non-data reply chunk accepted (a block status reply of 131,072
# extended extents is 2 MiB).
MAX_OPTION_REPLY = 64 * 1024 * 1024
MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024
_DONE = int(ReplyFlag.DONE)  # an int: & with the IntFlag goes through enum's slow path
_READ = int(Command.READ)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)


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


# -- handshake ------------------------------------------------------------------------------


@dataclass
class Negotiated:
    """What the handshake settled: the export's size and flags, the reply style, the meta
    contexts the server selected (id → name), or the export list of a LIST handshake."""

    size: int = -1
    flags: TransmissionFlag = field(default_factory=lambda: TransmissionFlag(0))
    structured: bool = False
    extended: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    exports: list[tuple[str, str]] = field(default_factory=list)


# A step of the option sequence: yields how many bytes it needs next, is sent those bytes.
_Steps = Generator[int, bytes, None]


class Handshake:
    """Option haggling as a state machine. Feed received bytes to :meth:`receive` and send
    :meth:`data_to_send` after each call, until :attr:`done`; then :attr:`result` holds what
    was negotiated. Errors raise ProtocolError or (the server refused) ReplyError.

    ``export=None`` lists the exports (NBD_OPT_LIST, then ABORT) instead of entering
    transmission. Options go one at a time, each after the previous answer: whether extended
    headers were accepted decides whether structured replies are asked for."""

    def __init__(
        self,
        export: str | None,
        *,
        contexts: Sequence[str] = (),
        structured: bool = True,
        extended: bool = True,
    ) -> None:
        self._export = export
        self._contexts = list(contexts)
        self._want_structured = structured
        self._want_extended = extended
        self._buf = bytearray()
        self._out = bytearray()
        self.result = Negotiated()
        self.done = False
        self._steps = self._list() if export is None else self._go(export)
        self._need = next(self._steps)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the server; returns any bytes past the end of the handshake."""
        self._buf += data
        while not self.done and len(self._buf) >= self._need:
            chunk = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            try:
                self._need = self._steps.send(chunk)
            except StopIteration:
                self.done = True
        if self.done:
            rest = bytes(self._buf)
            self._buf.clear()
            return rest
        return b""

    def _send(self, opt: Option, data: bytes = b"") -> None:
        self._out += option(opt, data)

    def _greet(self) -> _Steps:
        flags = parse_greeting((yield wire.GREETING.size))
        client_flags = ClientFlag.C_FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client_flags |= ClientFlag.C_NO_ZEROES
        self._out += wire.CLIENT_FLAGS.pack(client_flags)

    def _reply(self, opt: Option, replies: list[tuple[int, bytes]]) -> _Steps:
        """One option reply into ``replies``; an error reply raises ReplyError."""
        header = parse_option_reply((yield wire.OPTION_REPLY_HEADER.size))
        if header.option != opt:
            raise ProtocolError(f"reply to option {header.option}, expected {opt}")
        if header.length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {header.length} bytes")
        payload = (yield header.length) if header.length else b""
        if header.reply & (1 << 31):
            try:
                name = Reply(header.reply).name
            except ValueError:
                name = f"error {header.reply:#x}"
            raise ReplyError(header.reply, payload.decode("utf-8", "replace") or name)
        replies.append((header.reply, payload))

    def _replies_until_ack(self, opt: Option) -> Generator[int, bytes, list[tuple[int, bytes]]]:
        replies: list[tuple[int, bytes]] = []
        while not replies or replies[-1][0] != Reply.ACK:
            yield from self._reply(opt, replies)
        return replies[:-1]

    def _accepted(self, opt: Option) -> Generator[int, bytes, bool]:
        """A data-less option: True on ACK, False when the server refused it."""
        self._send(opt)
        try:
            yield from self._reply(opt, [])
        except ReplyError:
            return False
        return True

    def _go(self, export: str) -> _Steps:
        yield from self._greet()
        result = self.result
        if self._want_extended:
            result.extended = yield from self._accepted(Option.EXTENDED_HEADERS)
        result.structured = result.extended
        if self._want_structured and not result.structured:
            result.structured = yield from self._accepted(Option.STRUCTURED_REPLY)
        if self._contexts and result.structured:
            self._send(Option.SET_META_CONTEXT, meta_context_data(export, self._contexts))
            for _, payload in (yield from self._replies_until_ack(Option.SET_META_CONTEXT)):
                (context_id,) = wire.UINT32.unpack_from(payload, 0)
                result.contexts[context_id] = payload[4:].decode()
        self._send(Option.GO, info_go_data(export, [Info.BLOCK_SIZE]))
        for reply, payload in (yield from self._replies_until_ack(Option.GO)):
            if reply == Reply.INFO and wire.UINT16.unpack_from(payload, 0)[0] == Info.EXPORT:
                _, result.size, raw_flags = wire.INFO_EXPORT.unpack(payload)
                result.flags = TransmissionFlag(raw_flags)
        if result.size < 0:
            raise ProtocolError("server sent no NBD_INFO_EXPORT")

    def _list(self) -> _Steps:
        yield from self._greet()
        self._send(Option.LIST)
        for _, payload in (yield from self._replies_until_ack(Option.LIST)):
            (name_len,) = wire.UINT32.unpack_from(payload, 0)
            name = payload[4 : 4 + name_len].decode()
            self.result.exports.append((name, payload[4 + name_len :].decode()))
        self._send(Option.ABORT)


# -- transmission ---------------------------------------------------------------------------


class ReplySink(Protocol):
    """Where one request's reply goes, chunk by chunk, in the order the server sent it."""

    def pass_data(self, offset: int, length: int, last: bool, error: ReplyError | None) -> bool:
        """Whether the I/O layer moves this data payload itself (only asked with
        ``passthrough``; False: it is received into :meth:`data_buffer`). ``last``: the
        chunk ends the reply, and then ``error`` is how the reply ends (None: success)."""

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        """Whether the I/O layer moves this whole reply — one data chunk with DONE covering
        the READ exactly, its header included — on as it came, unread (only asked with
        ``verbatim``; False: the chunk takes the usual way)."""

    def data_buffer(self, offset: int, length: int) -> memoryview:
        """Memory of exactly ``length`` bytes for the data at ``offset`` (absolute); filled
        before :meth:`data` is called."""

    def data(self, offset: int, length: int) -> None:
        """The buffer for ``offset`` is filled."""

    def hole(self, offset: int, length: int) -> None:
        """``[offset, offset + length)`` reads as zeroes."""

    def block_status(self, context_id: int, extents: list[Extent]) -> None: ...

    def done(self, error: ReplyError | None) -> None:
        """The reply is complete: success, or the error that ends the request."""


class _Pending:
    """A request in flight (a plain class with slots: one is made for every request)."""

    __slots__ = ("command", "covered", "error", "length", "offset", "sink")

    def __init__(self, command: int, offset: int, length: int, sink: ReplySink) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.sink = sink
        self.covered: list[tuple[int, int]] = []
        self.error: ReplyError | None = None

    def fail(self, message: str, code: int = Errno.EIO) -> None:
        if self.error is None:
            self.error = ReplyError(code, message)

    def final_error(self) -> ReplyError | None:
        if self.error is not None or self.command != Command.READ:
            return self.error
        if len(self.covered) == 1 and self.covered[0] == (self.offset, self.length):
            return None
        pos = self.offset
        for start, length in sorted(self.covered):
            if start != pos:
                break
            pos += length
        else:
            if pos == self.offset + self.length:
                return None
        got = sum(n for _, n in self.covered)
        return ReplyError(
            Errno.EIO, f"reply to READ {self.offset}+{self.length} covered {got} bytes unevenly"
        )


_Stage = Callable[[memoryview], None]


class Transmission:
    """Requests out, replies in, for one connection in transmission phase.

    :meth:`request` registers a request and returns its bytes; received bytes go into
    :meth:`get_buffer` and are announced with :meth:`buffer_updated`, which calls the sinks.
    A ProtocolError from :meth:`buffer_updated` means the stream can no longer be trusted:
    the caller closes the connection and calls :meth:`fail_all`."""

    def __init__(self, *, structured: bool, extended: bool) -> None:
        self.structured = structured
        self.extended = extended
        self._pending: dict[int, _Pending] = {}
        # Headers are read into a staging area of a fixed size; up to ``_ahead`` bytes are
        # asked for at once (a chunk header plus a data offset), what belongs to the next
        # message stays staged.
        self._ahead = 40 if extended else 28 if structured else 16
        self._stage = bytearray(64)
        self._staged = 0
        self._header_size = wire.EXTENDED_REPLY.size if extended else wire.SIMPLE_REPLY.size
        # Set while a payload is being received: its memory, how much is in, what follows.
        self._dest: memoryview | None = None
        self._dest_pos = 0
        self._then: _Stage | None = None
        self._cookie = 0
        self._chunk_flags = 0
        self._data_at = 0
        self._data_length = 0
        self._error_type = 0
        self.passthrough = False
        """Whether sinks are asked :meth:`ReplySink.pass_data` (the I/O layer can move
        payloads)."""
        self.reads = 0
        """READs in flight (the I/O layer peeks only while there are)."""
        self.verbatim = False
        """Whether the I/O layer peeks at each reply's first bytes (:meth:`peeked`) to move
        whole replies on as they came (structured replies with compact headers only)."""
        self.passing = 0
        """Bytes of a data payload (with ``verbatim``: or of a whole reply) the I/O layer is
        to move now, not receive."""

    def __contains__(self, cookie: int) -> bool:
        return cookie in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def request(
        self, cookie: int, command: int, flags: int, offset: int, length: int, sink: ReplySink
    ) -> bytes:
        if cookie in self._pending:
            raise ValueError(f"cookie {cookie} is in flight already")
        self._pending[cookie] = _Pending(command, offset, length, sink)
        if command == _READ:
            self.reads += 1
        return request(cookie, command, flags, offset, length, extended=self.extended)

    def forwarded(self, reads: Sequence[tuple[int, int, int, ReplySink]]) -> bool:
        """Register READs ``(cookie, offset, length, sink)`` whose request bytes the caller
        sends itself (forwarded as another client wrote them); False, with none of them
        registered, when a cookie is in flight already."""
        pending = self._pending
        for i, (cookie, offset, length, sink) in enumerate(reads):
            if cookie in pending:
                for taken in reads[:i]:
                    del pending[taken[0]]
                return False
            pending[cookie] = _Pending(_READ, offset, length, sink)
        self.reads += len(reads)
        return True

    def disconnect(self) -> bytes:
        return request(0, Command.DISC, 0, 0, 0, extended=self.extended)

    def fail_all(self, error: ReplyError) -> None:
        """Every request in flight ends with ``error`` (the connection is gone)."""
        pending, self._pending = self._pending, {}
        self.passing = self.reads = 0
        for p in pending.values():
            p.sink.done(error)

    # -- receiving ------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        assert not self.passing, "the I/O layer moves this payload"
        if self._dest is not None:
            return self._dest[self._dest_pos :]
        return memoryview(self._stage)[self._staged : self._ahead]

    def buffer_updated(self, n: int) -> None:
        if self._dest is not None:
            self._dest_pos += n
            if self._dest_pos < len(self._dest):
                return
            self._payload_complete()
        else:
            self._staged += n
        self._parse_staged()

    def passed(self, n: int) -> None:
        """``n`` bytes of the payload being passed were moved."""
        assert 0 < n <= self.passing
        self.passing -= n
        if self.passing:
            return
        self._pending[self._cookie].sink.data(self._data_at, self._data_length)
        if self._chunk_flags & _DONE:
            self._complete(self._cookie)
        if self._staged:
            self._parse_staged()

    def peeked(self, head: bytes | bytearray | memoryview) -> bool:
        """The I/O layer peeked at the next ``wire.DATA_CHUNK.size`` bytes of the stream
        (still unread) with nothing staged or half received. True when they begin a whole
        reply to a READ — one OFFSET_DATA chunk with DONE covering the request exactly —
        whose sink takes it verbatim (:meth:`ReplySink.pass_reply`): then :attr:`passing`
        is the whole chunk, header included, for the I/O layer to move. Else False and
        nothing changed: the bytes are received and parsed as usual."""
        if self._staged or self._dest is not None or self.passing or self.extended:
            return False
        magic, flags, rtype, cookie, length, offset = wire.DATA_CHUNK.unpack(head)
        pending = self._whole_read(flags, rtype, cookie, length, offset)
        if magic != STRUCTURED_REPLY_MAGIC or pending is None:
            return False
        if not pending.sink.pass_reply(cookie, offset, pending.length):
            return False
        self._cookie, self._chunk_flags = cookie, flags
        self._data_at = offset
        self._data_length = pending.length
        self.passing = wire.DATA_CHUNK.size + pending.length
        pending.covered.append((offset, pending.length))
        return True

    def feed(self, data: bytes) -> None:
        """Bytes received some other way (e.g. right after the handshake)."""
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def _take(self, n: int) -> bytes:
        out = bytes(self._stage[:n])
        self._consume(n)
        return out

    def _consume(self, n: int) -> None:
        rest = self._staged - n
        if rest:
            self._stage[:rest] = self._stage[n : self._staged]
        self._staged = rest

    def _expect(self, dest: memoryview, then: _Stage) -> None:
        """Receive ``len(dest)`` bytes into ``dest``, then call ``then(dest)``; staged bytes
        that belong to it are moved there first."""
        self._dest, self._dest_pos, self._then = dest, 0, then
        n = min(self._staged, len(dest))
        if n:
            dest[:n] = self._stage[:n]
            self._take(n)
            self._dest_pos = n
        if self._dest_pos == len(dest):
            self._payload_complete()

    def _payload_complete(self) -> None:
        dest, then = self._dest, self._then
        assert dest is not None and then is not None
        self._dest, self._then = None, None
        then(dest)

    def _parse_staged(self) -> None:
        while self._dest is None and not self.passing and self._staged >= self._header_size:
            if self.extended:
                self._extended_header()
                continue
            (magic,) = wire.UINT32.unpack_from(self._stage, 0)
            if magic == SIMPLE_REPLY_MAGIC:
                self._simple_reply()
            elif magic == STRUCTURED_REPLY_MAGIC:
                if self._staged == wire.DATA_CHUNK.size and self.passthrough and self._whole():
                    return
                if self._staged < wire.STRUCTURED_REPLY.size:
                    return
                _, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack_from(self._stage)
                self._consume(wire.STRUCTURED_REPLY.size)
                self._chunk(cookie, flags, rtype, length)
            else:
                raise ProtocolError(f"bad reply magic 0x{magic:x}")

    def _whole_read(
        self, flags: int, rtype: int, cookie: int, length: int, offset: int
    ) -> "_Pending | None":
        """The READ in flight whose whole reply is the data chunk with these header fields
        (DONE, covering the request exactly, nothing received for it yet), or None."""
        pending = self._pending.get(cookie)
        if (
            rtype != _OFFSET_DATA
            or flags != _DONE
            or pending is None
            or pending.covered
            or pending.error is not None
            or offset != pending.offset
            or length <= wire.OFFSET_DATA.size
            or length - wire.OFFSET_DATA.size != pending.length
            or pending.command != _READ
        ):
            return None
        return pending

    def _whole(self) -> bool:
        """The fast path of a pass-through reader: the staged bytes are exactly the header
        and offset of one data chunk that is the whole reply to a READ (DONE, covering its
        request), and its sink passes the payload through. Anything else: False, the
        general parse follows."""
        _, flags, rtype, cookie, length, offset = wire.DATA_CHUNK.unpack_from(self._stage)
        pending = self._whole_read(flags, rtype, cookie, length, offset)
        if pending is None:
            return False
        if not pending.sink.pass_data(offset, pending.length, True, None):
            return False
        self._staged = 0
        self._cookie, self._chunk_flags = cookie, flags
        self._data_at = offset
        self._data_length = self.passing = pending.length
        pending.covered.append((offset, pending.length))
        return True

    def _extended_header(self) -> None:
        magic, flags, rtype, cookie, _, length = wire.EXTENDED_REPLY.unpack(
            self._take(wire.EXTENDED_REPLY.size)
        )
        if magic != EXTENDED_REPLY_MAGIC:
            raise ProtocolError(f"bad extended reply magic 0x{magic:x}")
        self._chunk(cookie, flags, rtype, length)

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"reply for unknown cookie {cookie}")
        return pending

    def _simple_reply(self) -> None:
        _, error, cookie = wire.SIMPLE_REPLY.unpack(self._take(wire.SIMPLE_REPLY.size))
        pending = self._lookup(cookie)
        self._cookie = cookie
        if error:
            pending.fail(f"server error {error}", error)
        elif pending.command == Command.READ and pending.length:
            dest = pending.sink.data_buffer(pending.offset, pending.length)
            self._expect(dest, self._simple_data)
            return
        elif pending.command == Command.READ:
            pending.covered.append((pending.offset, 0))
        self._complete(cookie)

    def _simple_data(self, _dest: memoryview) -> None:
        pending = self._pending[self._cookie]
        pending.covered.append((pending.offset, pending.length))
        pending.sink.data(pending.offset, pending.length)
        self._complete(self._cookie)

    def _chunk(self, cookie: int, flags: int, rtype: int, length: int) -> None:
        pending = self._lookup(cookie)
        self._cookie, self._chunk_flags = cookie, flags
        if rtype == ReplyType.OFFSET_DATA:
            if length <= wire.OFFSET_DATA.size:
                raise ProtocolError(f"OFFSET_DATA chunk of {length} bytes")
            if length - wire.OFFSET_DATA.size > pending.length:
                raise ProtocolError("OFFSET_DATA chunk longer than its request")
            self._data_length = length - wire.OFFSET_DATA.size
            if self._staged >= wire.OFFSET_DATA.size:  # read along with the header: usual
                (offset,) = wire.OFFSET_DATA.unpack_from(self._stage)
                self._consume(wire.OFFSET_DATA.size)
                self._data_at_offset(offset)
            else:
                self._expect(memoryview(bytearray(wire.OFFSET_DATA.size)), self._data_offset)
            return
        if length > MAX_CHUNK_PAYLOAD:
            raise ProtocolError(f"reply chunk of {length} bytes")
        handler: dict[int, _Stage] = {
            ReplyType.NONE: self._none,
            ReplyType.OFFSET_HOLE: self._hole,
            ReplyType.BLOCK_STATUS: self._status,
            ReplyType.BLOCK_STATUS_EXT: self._status,
        }
        then = handler.get(rtype)
        if then is None:
            if not rtype & 0x8000:
                raise ProtocolError(f"unknown reply chunk type {rtype}")
            self._error_type = rtype  # before _expect: the payload may be staged already
            then = self._error
        self._expect(memoryview(bytearray(length)), then)

    def _data_offset(self, raw: memoryview) -> None:
        (offset,) = wire.OFFSET_DATA.unpack(raw)
        self._data_at_offset(offset)

    def _data_at_offset(self, offset: int) -> None:
        pending = self._pending[self._cookie]
        length = self._data_length
        ok = pending.command == Command.READ and (
            pending.offset <= offset and offset + length <= pending.offset + pending.length
        )
        if not ok:
            pending.fail(f"data chunk {offset}+{length} outside the request")
        if pending.error is not None:
            self._expect(memoryview(bytearray(length)), self._chunk_end)  # thrown away
            return
        pending.covered.append((offset, length))
        self._data_at = offset
        if self.passthrough and not self._staged:
            last = bool(self._chunk_flags & _DONE)
            error = pending.final_error() if last else None
            if pending.sink.pass_data(offset, length, last, error):
                self.passing = length
                return
        self._expect(pending.sink.data_buffer(offset, length), self._data_filled)

    def _data_filled(self, dest: memoryview) -> None:
        self._pending[self._cookie].sink.data(self._data_at, len(dest))
        self._chunk_end(dest)

    def _hole(self, payload: memoryview) -> None:
        pending = self._pending[self._cookie]
        if len(payload) != wire.OFFSET_HOLE.size:
            raise ProtocolError(f"OFFSET_HOLE chunk of {len(payload)} bytes")
        offset, length = wire.OFFSET_HOLE.unpack(payload)
        ok = pending.command == Command.READ and (
            length > 0 and pending.offset <= offset <= pending.offset + pending.length - length
        )
        if not ok:
            pending.fail(f"hole chunk {offset}+{length} outside the request")
        if pending.error is None:
            pending.covered.append((offset, length))
            pending.sink.hole(offset, length)
        self._chunk_end(payload)

    def _status(self, payload: memoryview) -> None:
        pending = self._pending[self._cookie]
        rtype = ReplyType.BLOCK_STATUS_EXT if self.extended else ReplyType.BLOCK_STATUS
        context_id, extents = parse_block_status(rtype, bytes(payload))
        if pending.command != Command.BLOCK_STATUS:
            pending.fail("block status chunk for another command")
        elif pending.error is None:
            pending.sink.block_status(context_id, extents)
        self._chunk_end(payload)

    def _error(self, payload: memoryview) -> None:
        pending = self._pending[self._cookie]
        if self._error_type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            code, message = parse_error_chunk(bytes(payload))
            pending.fail(message or f"server error {code}", code or Errno.EIO)
        else:
            pending.fail(f"unknown error chunk type {self._error_type}")
        self._chunk_end(payload)

    def _none(self, payload: memoryview) -> None:
        if len(payload):
            raise ProtocolError("NONE chunk with a payload")
        self._chunk_end(payload)

    def _chunk_end(self, _payload: memoryview) -> None:
        if self._chunk_flags & _DONE:
            self._complete(self._cookie)

    def _complete(self, cookie: int) -> None:
        pending = self._pending.pop(cookie)
        if pending.command == _READ:
            self.reads -= 1
        pending.sink.done(pending.final_error())
