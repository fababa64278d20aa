"""Relayed reads: the READs of one client connection to a session export go over an NBD
connection of its own to QEMU's export, with the client's cookie, and each reply chunk is
written to the client from the callback that completes it — from the very buffer the
upstream payload was received into (one copy in user space fewer than a read() that returns
data, no Future, no Task, no event-loop hop per request).

On a plain client connection (one with a DirectWriter) data payloads do not even pass
through nbdsrv's memory: each is spliced from QEMU's socket into a pipe and from the pipe to
the client's socket, behind the chunk header nbdsrv writes. A data chunk carries DONE when
QEMU's does and the reply is then known to be complete and correct (else the payload is
dropped and an error sent); if QEMU's connection breaks in the middle of a payload that is
half sent, the client connection is closed: it could not be told otherwise. When both ends
speak the same header form, a reply that is one data chunk with DONE covering its READ goes
on verbatim — QEMU's header is the client's, so header and payload are spliced into the
pipe together — and such replies are gathered in the pipe and sent on with one splice.

Otherwise (TLS) structured clients get the chunks as QEMU sent them (holes stay holes); the
last chunk is held back until QEMU's reply is known to be complete and correct, so it can
carry DONE or be replaced by an error. Simple-reply clients and DF reads get one reply once
all is in.

A chunk is only sent while the export can still be trusted: once the session has failed
(its point in time may be gone) or the export was removed, the rest of the reply becomes an
error (EIO, or ESHUTDOWN for a removed export), like any reply that QEMU got wrong.
"""

import asyncio
import contextlib
import fcntl
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from ..exports.export import Export
from ..proto import wire
from ..proto.constants import (
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    ReplyType,
)
from ..proto.errors import ReplyError
from ..proto.server import Request, ServerConnection
from .client import ConnectionClosed, NBDClient
from .direct_writer import SPLICE_FLAGS, DirectWriter

_DONE = int(ReplyFlag.DONE)
_UINT32_MAX = 0xFFFFFFFF
_DF = int(CommandFlag.DF)
_OFFSET_SIZE = wire.OFFSET_DATA.size
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
# The pipe between QEMU's socket and the client's: 1 MiB is what an unprivileged process
# may ask for (fs.pipe-max-size); a reply chunk goes through in one or a few pieces.
PIPE_SIZE = 1024 * 1024

# Called once per relayed request: its cost, bytes served (0 on error), and the error text.
Finished = Callable[[Request, int, tuple[Errno, str] | None], None]
Write = Callable[[Sequence[bytes | bytearray | memoryview]], None]  # writelines
# The client connection must be closed: a reply was cut in the middle (why).
Fatal = Callable[[str], None]


def open_pipe() -> tuple[tuple[int, int], int]:
    """A non-blocking pipe for splicing, (read end, write end), and the bytes it holds:
    PIPE_SIZE when the kernel grants it, its default otherwise."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return (read_end, write_end), fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)


class ReadRelay:
    """READs of one client connection, relayed over ``upstream``."""

    def __init__(
        self,
        export: Export,
        upstream: NBDClient,
        core: ServerConnection,
        write: Write,
        finished: Finished,
        writer: DirectWriter | None = None,
        fatal: Fatal | None = None,
    ) -> None:
        self.export = export
        self.upstream = upstream
        self.core = core
        self.write = write
        self.finished = finished
        self.writer = writer
        self.fatal = fatal
        self._pipe: tuple[int, int] | None = None
        self._pipe_size = 0
        self._unqueued = 0  # bytes in the pipe, not queued for the client yet
        # Whole replies moved verbatim are gathered in the pipe behind one open stream and
        # queued for the client together when a wake-up's reads end (flush) or the pipe is
        # full: one splice out for several replies.
        self._gathering = False  # the writer's stream is open for gathered replies
        self._moving = False  # a verbatim reply is half in the pipe
        self._gathered = 0  # bytes of whole replies among the unqueued ones
        self.compact = not core.extended  # the client's chunk headers
        self.forwards = (
            writer is not None
            and core.structured
            and self.compact
            and upstream.structured
            and not upstream.extended
        )
        """Whether plain READs may go through :meth:`forward`: replies are spliced, and
        both ends speak structured replies with compact headers."""
        if writer is not None:
            self._pipe, self._pipe_size = open_pipe()
            upstream.read_directly(self._move, self.flush)
            if self.forwards:
                # Both ends speak the same header form and a forwarded READ keeps the
                # client's cookie: a whole data reply's header is the one to send.
                upstream.move_verbatim()

    def read(self, request: Request) -> None:
        sink: _Read
        df = int(request.flags) & _DF  # int: & on the IntFlag itself is slow
        if not self.core.structured or df:
            sink = _Whole(self, request)
        elif self.writer is not None:
            sink = _Spliced(self, request, self.writer)
        else:
            sink = _Streamed(self, request)
        flags = _DF if df else 0
        sink.error = self.refusal()
        if sink.error is not None:
            asyncio.get_running_loop().call_soon(sink.finish)
            return
        try:
            self.upstream.submit(
                Command.READ, flags, request.offset, request.length, sink, cookie=request.cookie
            )
        except ConnectionClosed as e:
            # Never call back into the connection from inside its own start of the request.
            asyncio.get_running_loop().call_soon(sink.done, e)

    def takes(self, request: Request) -> bool:
        """Whether a write, zeroes, trim, flush or cache request can go upstream as it is:
        an upstream link with compact headers takes lengths of 32 bits only (a longer
        zeroing or trim from an extended client goes through the export, which splits it)."""
        return self.upstream.extended or request.length <= _UINT32_MAX

    def command(self, request: Request) -> None:
        """Relay a request of a writable export (see :meth:`takes`); the reply is an
        acknowledgement or an error."""
        sink = _Acknowledged(self, request)
        sink.error = self.refusal()
        if sink.error is not None:
            asyncio.get_running_loop().call_soon(sink.done, None)
            return
        try:
            self.upstream.submit(
                request.command,
                int(request.flags),
                request.offset,
                request.length,
                sink,
                cookie=request.cookie,
                payload=request.data,
            )
        except ConnectionClosed as e:
            asyncio.get_running_loop().call_soon(sink.done, e)

    def begin_write(self, request: Request) -> bool:
        """Relay a WRITE whose payload the caller then moves to the upstream link itself
        (NBDClient.write_payload, end_write). False when it cannot go: its error reply is
        on its way and the payload is the caller's to throw away."""
        sink = _Acknowledged(self, request)
        sink.error = self.refusal()
        if sink.error is not None:
            asyncio.get_running_loop().call_soon(sink.done, None)
            return False
        try:
            self.upstream.begin_write(
                int(request.flags), request.offset, request.length, sink, request.cookie
            )
        except ConnectionClosed as e:
            asyncio.get_running_loop().call_soon(sink.done, e)
            return False
        return True

    def forward(self, data: bytes, requests: list[Request]) -> bool:
        """Relay plain READs (``requests``, parsed from ``data``; see :attr:`forwards`) by
        sending ``data`` upstream as it is: same cookies, same header form, no request built
        again. False, with nothing sent, when they need :meth:`read` (the export refuses,
        a cookie is in flight, the upstream link is gone)."""
        writer = self.writer
        assert self.forwards and writer is not None
        if self.export.closed or self.export.broken() is not None:
            return False
        reads = [(r.cookie, r.offset, r.length, _Spliced(self, r, writer)) for r in requests]
        try:
            return self.upstream.forward(data, reads)
        except ConnectionClosed:
            return False

    def cork(self) -> None:
        self.upstream.cork()

    def uncork(self) -> None:
        self.upstream.uncork()

    def close(self) -> None:
        self.upstream.abort()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            for fd in pipe:
                os.close(fd)

    def writable(self) -> None:
        """The client's socket took what was queued: the pipe has room again."""
        if self._pipe is not None:
            self.upstream.resume_reading()

    def begin_chunk(self, writer: DirectWriter, head: bytes) -> None:
        """A chunk whose payload will be spliced: ``head`` (its header, and any chunk held
        before it) goes into the pipe in front of the payload when there is room, so the
        client gets the whole chunk in one write."""
        self._end_gathering(writer)
        writer.open_stream()
        pipe = self._pipe
        assert pipe is not None and not self._unqueued
        try:
            self._unqueued = os.write(pipe[1], head)  # all or nothing: below PIPE_BUF
        except BlockingIOError:
            writer.stream([head])

    def begin_verbatim(self, writer: DirectWriter) -> None:
        """A whole reply is about to be moved into the pipe as it came, header included."""
        if not self._gathering:
            writer.open_stream()
            self._gathering = True
        self._moving = True

    def end_verbatim(self) -> None:
        """The reply begun last is all in the pipe."""
        self._moving = False
        self._gathered = self._unqueued

    def flush(self) -> None:
        """A wake-up's reads ended: the whole replies gathered go to the client; the stream
        stays open only while a reply is half in the pipe. While one is, QEMU is sending
        and the next wake-up is near: the replies before it wait for it (up to half the
        pipe), so that one splice takes several to the client."""
        writer, pipe = self.writer, self._pipe
        if not self._gathering or writer is None or pipe is None:
            return
        if self._moving and self._gathered < self._pipe_size // 2:
            return
        if self._gathered:
            writer.stream_pipe(pipe[0], self._gathered)
            self._unqueued -= self._gathered
            self._gathered = 0
        if not self._moving:
            self._gathering = False
            writer.close_stream()

    def end_stream(self, writer: DirectWriter) -> None:
        """A chunk's payload stopped half way (QEMU's connection broke): the whole replies
        gathered before it go, the stream is closed."""
        self._moving = False
        if self._gathering:
            self.flush()
        else:
            writer.close_stream()

    def _end_gathering(self, writer: DirectWriter) -> None:
        if self._gathering and self._pipe is not None:
            self._queue_unqueued(writer, self._pipe[0])
            self._gathering = False
            writer.close_stream()

    def _move(self, fd: int, n: int) -> int | None:
        """Splice up to ``n`` payload bytes from QEMU's socket ``fd`` into the pipe; they
        are queued for the client once the payload is in, or the pipe is full (the
        upstream link's Mover)."""
        writer, pipe = self.writer, self._pipe
        assert writer is not None and pipe is not None
        if writer.closed:
            return None
        room = self._pipe_size - writer.pipe_bytes - self._unqueued
        try:
            if room <= 0:
                raise BlockingIOError()
            moved = os.splice(fd, pipe[1], min(n, room), flags=SPLICE_FLAGS)
        except BlockingIOError:
            # No data from QEMU yet, or the pipe is full (it counts buffers, not only
            # bytes): when the client has some of it still to take, wait for that.
            self._queue_unqueued(writer, pipe[0])
            if writer.pipe_bytes:
                return None  # writable() resumes
            raise
        self._unqueued += moved
        if moved == room or (moved == n and not self._gathering):
            self._queue_unqueued(writer, pipe[0])
        return moved

    def _queue_unqueued(self, writer: DirectWriter, read_end: int) -> None:
        if self._unqueued:
            writer.stream_pipe(read_end, self._unqueued)
            self._unqueued = 0
        self._gathered = 0

    def refusal(self) -> tuple[Errno, str] | None:
        """Why nothing more may be sent from upstream, if anything."""
        if self.export.closed:
            return Errno.ESHUTDOWN, "export is gone"
        reason = self.export.broken()
        if reason is not None:
            return Errno.EIO, f"backup session failed: {reason}"
        return None


class _Sink:
    """What every reply sink of the relay has: its request, the first error it saw, and no
    pass-through unless a subclass offers one."""

    def __init__(self, relay: ReadRelay, request: Request) -> None:
        self.relay = relay
        self.request = request
        self.error: tuple[Errno, str] | None = None

    def pass_data(self, offset: int, length: int, last: bool, error: ReplyError | None) -> bool:
        return False

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        return False


class _Acknowledged(_Sink):
    """The reply to a relayed write, zeroes, trim, flush or cache request: QEMU's errno
    passes through (ENOSPC, ENOTSUP for a FAST_ZERO it cannot do fast, …)."""

    def data_buffer(self, offset: int, length: int) -> memoryview:
        self.error = (Errno.EIO, "data in the reply to a write")  # QEMU never sends it
        return memoryview(bytearray(length))

    def data(self, offset: int, length: int) -> None:
        pass

    def hole(self, offset: int, length: int) -> None:
        self.error = (Errno.EIO, "a hole in the reply to a write")

    def block_status(self, context_id: int, extents: list[tuple[int, int]]) -> None:
        self.error = (Errno.EIO, "block status in the reply to a write")

    def done(self, error: ReplyError | None) -> None:
        relay, request = self.relay, self.request
        if self.error is None:
            self.error = relay.refusal()
        if error is not None and self.error is None:
            code = Errno(error.errno) if error.errno in _ERRNOS else Errno.EIO
            self.error = (code, f"QEMU: {error.message}")
        if self.error is not None:
            relay.write([relay.core.error_reply(request, *self.error)])
            relay.finished(request, 0, self.error)
            return
        relay.write([relay.core.ok_reply(request)])
        if request.command == Command.WRITE or request.command == Command.WRITE_ZEROES:
            relay.export.write_served(request.command, request.offset, request.length)
        relay.finished(request, 0, None)


_ERRNOS = frozenset(int(code) for code in Errno if code != Errno.OK)


class _Read(_Sink, ABC):
    """The reply to one relayed READ (a ReplySink of the upstream client)."""

    def block_status(self, context_id: int, extents: list[tuple[int, int]]) -> None:
        self.error = (Errno.EIO, "block status in a READ reply")  # QEMU never sends it

    def upstream_error(self, error: ReplyError | None) -> None:
        if error is not None and self.error is None:
            # Whatever QEMU said, the client sees EIO: the data is not there.
            self.error = (Errno.EIO, f"reading from QEMU: {error}")
            if not isinstance(error, ConnectionClosed):  # QEMU failed it: tell the export
                self.relay.export.read_failed(f"reading from QEMU: {error}")

    def finish(self) -> None:
        relay, request = self.relay, self.request
        if self.error is not None:
            relay.write([relay.core.error_reply(request, *self.error)])
            relay.finished(request, 0, self.error)
        else:
            relay.export.read_served(request.offset, request.length)
            relay.finished(request, request.length, None)

    @abstractmethod
    def data_buffer(self, offset: int, length: int) -> memoryview: ...

    @abstractmethod
    def data(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def hole(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def done(self, error: ReplyError | None) -> None: ...


class _Streamed(_Read):
    """A structured client's reply, chunk by chunk as QEMU sends it."""

    def __init__(self, relay: ReadRelay, request: Request) -> None:
        super().__init__(relay, request)
        self.buffer: bytearray | None = None
        self.held: bytearray | None = None  # the last complete chunk, not sent yet

    def data_buffer(self, offset: int, length: int) -> memoryview:
        prefix = self.relay.core.chunk_header_size + _OFFSET_SIZE
        self.buffer = bytearray(prefix + length)
        return memoryview(self.buffer)[prefix:]

    def data(self, offset: int, length: int) -> None:
        chunk, self.buffer = self.buffer, None
        assert chunk is not None
        core = self.relay.core
        chunk[: core.chunk_header_size + _OFFSET_SIZE] = core.chunk_header(
            self.request, 0, ReplyType.OFFSET_DATA, wire.OFFSET_DATA.size + length
        ) + wire.OFFSET_DATA.pack(offset)
        self._hold(chunk)

    def hole(self, offset: int, length: int) -> None:
        core = self.relay.core
        chunk = bytearray(
            core.chunk_header(self.request, 0, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.size)
            + wire.OFFSET_HOLE.pack(offset, length)
        )
        self._hold(chunk)

    def _hold(self, chunk: bytearray) -> None:
        if self.error is None:
            self.error = self.relay.refusal()
        if self.error is not None:
            self.held = None
            return
        if self.held is not None:
            self.relay.write([self.held])
        self.held = chunk

    def done(self, error: ReplyError | None) -> None:
        if self.error is None:
            self.error = self.relay.refusal()  # first: a removed export explains a lost link
        self.upstream_error(error)
        held, self.held = self.held, None
        if self.error is None:
            if held is None:
                held = bytearray(self.relay.core.chunk_header(self.request, 0, ReplyType.NONE, 0))
            held[5] |= ReplyFlag.DONE  # flags: bytes 4-5 of either chunk header
            self.relay.write([held])
        self.finish()


class _Spliced(_Streamed):
    """A structured client's reply on a plain connection: data payloads spliced from QEMU's
    socket to the client's as they arrive; whatever is not passed through (a payload to be
    dropped, holes, simple replies from upstream) goes as in _Streamed."""

    def __init__(self, relay: ReadRelay, request: Request, writer: DirectWriter) -> None:
        # One is made for every READ: the attributes of _Read and _Streamed set here, not
        # through a chain of __init__ calls.
        self.relay = relay
        self.request = request
        self.error: tuple[Errno, str] | None = None
        self.buffer: bytearray | None = None
        self.held: bytearray | None = None
        self.writer = writer
        self.streaming = False  # a data chunk is half sent
        self.verbatim = False  # that chunk is QEMU's whole reply, moved as it came
        self.ended = False  # a chunk with DONE was sent

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        # QEMU's header is the client's when the cookie is the client's (a forwarded READ;
        # read() may have had to take another) and nothing is held to go before it.
        if cookie != self.request.cookie or self.held is not None:
            return False
        if self.error is None:
            self.error = self.relay.refusal()
        if self.error is not None:
            return False  # received and dropped: done() sends the error
        self.relay.begin_verbatim(self.writer)
        self.streaming = self.verbatim = self.ended = True
        return True

    def pass_data(self, offset: int, length: int, last: bool, error: ReplyError | None) -> bool:
        if self.error is None:
            self.error = self.relay.refusal()
        if self.error is not None or error is not None:
            return False  # received and dropped: done() sends the error
        held, self.held = self.held, None
        flags = _DONE if last else 0
        request = self.request
        if self.relay.compact:
            head = wire.DATA_CHUNK.pack(
                STRUCTURED_REPLY_MAGIC,
                flags,
                _OFFSET_DATA,
                request.cookie,
                _OFFSET_SIZE + length,
                offset,
            )
        else:
            head = self.relay.core.chunk_header(
                request, flags, _OFFSET_DATA, _OFFSET_SIZE + length
            ) + wire.OFFSET_DATA.pack(offset)
        self.relay.begin_chunk(self.writer, head if held is None else bytes(held) + head)
        self.streaming = True
        self.ended = last
        return True

    def data(self, offset: int, length: int) -> None:
        if not self.streaming:
            super().data(offset, length)
            return
        self.streaming = False
        if self.verbatim:
            self.relay.end_verbatim()  # flush() queues it with the others gathered
        else:
            self.writer.close_stream()

    def done(self, error: ReplyError | None) -> None:
        if self.streaming:
            # QEMU's connection broke in the middle of a payload that is half sent.
            self.streaming = False
            self.relay.end_stream(self.writer)
            if self.relay.fatal is not None:
                self.relay.fatal(f"QEMU's connection broke during a READ reply: {error}")
            self.error = (Errno.EIO, f"reading from QEMU: {error}")
            self.relay.finished(self.request, 0, self.error)
        elif self.ended:  # the last chunk went out with DONE already
            self.finish()
        else:
            super().done(error)


class _Whole(_Read):
    """One reply once everything is in: simple replies, and DF (one data chunk)."""

    def __init__(self, relay: ReadRelay, request: Request) -> None:
        super().__init__(relay, request)
        self.buffer: bytearray | None = None

    def data_buffer(self, offset: int, length: int) -> memoryview:
        request = self.request
        if self.buffer is None:
            self.buffer = bytearray(request.length)  # holes stay zero
        start = offset - request.offset
        return memoryview(self.buffer)[start : start + length]

    def data(self, offset: int, length: int) -> None:
        pass

    def hole(self, offset: int, length: int) -> None:
        pass

    def done(self, error: ReplyError | None) -> None:
        if self.error is None:
            self.error = self.relay.refusal()  # first: a removed export explains a lost link
        self.upstream_error(error)
        if self.error is None:
            request = self.request
            segment = (request.offset, request.length, self.buffer)
            self.relay.write(self.relay.core.read_reply(request, [segment]))
        self.finish()
