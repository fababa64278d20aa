"""An asyncio NBD client on the protocol core: the upstream link to QEMU's exports, and a
client for tests. Many requests may be in flight; replies are matched by cookie.

    client = await NBDClient.connect(address, "disk0", contexts=["base:allocation"])
    data = await client.read(0, 65536)
    extents = await client.block_status(0, client.size)   # {context name: [(length, flags)]}
    await client.close()

The connection is a ``BufferedProtocol``: the protocol core names the memory each received
byte belongs in, so a READ payload lands directly in the buffer its sink provides (for a
relayed read, the reply that goes on to nbdsrv's own client) — see :meth:`NBDClient.submit`.
"""

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Sequence

from ..proto import wire
from ..proto.client import Handshake, Negotiated, ReplySink, Transmission
from ..proto.constants import Command, CommandFlag, Errno
from ..proto.errors import NBDError, ProtocolError, ReplyError
from ..proto.extents import Extent
from .address import Address
from .direct_writer import DirectWriter

log = logging.getLogger(__name__)

# Socket buffers of an upstream connection: a 2 MiB read reply passes in one go (QEMU sizes
# its own NBD sockets the same way).
SOCKET_BUFFER = 4 * 1024 * 1024
_PAYLOAD_LEN = int(CommandFlag.PAYLOAD_LEN)
# Reads per wake-up of a directly read link, so one busy link does not starve the others.
DIRECT_READS_PER_WAKEUP = 32

# Moves up to ``n`` bytes of a passed-through payload from the socket ``fd``: the bytes
# moved (0: the socket reached its end), or None when it cannot take any now (it calls
# NBDClient.resume_reading once it can).
Mover = Callable[[int, int], int | None]
# Called when a wake-up's reading ends: what the mover gathered may go on now.
Flush = Callable[[], None]
_PEEK = wire.DATA_CHUNK.size


class ConnectionClosed(ReplyError):
    """The connection ended while requests were in flight (they fail with EIO)."""

    code = "nbd-closed"

    def __init__(self, message: str) -> None:
        super().__init__(Errno.EIO, message)


class _Link(asyncio.BufferedProtocol):
    """One socket: the handshake first, then the transmission core."""

    def __init__(self, handshake: Handshake) -> None:
        self._handshake = handshake
        self.core: Transmission | None = None
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[Negotiated] = asyncio.get_running_loop().create_future()
        self.closed: BaseException | None = None
        self._drained: asyncio.Future[None] | None = None
        self._hs_buffer = bytearray(64 * 1024)
        # Set once the link reads its socket itself (read_directly).
        self._direct: socket.socket | None = None
        self._mover: Mover | None = None
        self._flush: Flush | None = None
        self._peek = bytearray(_PEEK)
        self._reading = False
        # Set once requests are written to the socket here, not through the transport
        # (write_directly); _wake is called when it can take more or the link is gone.
        self.writer: DirectWriter | None = None
        self._wake: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.core is not None:
            return self.core.get_buffer()
        return memoryview(self._hs_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.core is not None:
                self.core.buffer_updated(nbytes)
                if self._drained is not None and not len(self.core):
                    self._drained.set_result(None)
                    self._drained = None
            else:
                self._negotiate(bytes(self._hs_buffer[:nbytes]))
        except (ProtocolError, ReplyError) as e:
            self.abort(e)
        except Exception as e:  # a bug must not leave callers waiting forever
            log.exception("NBD client failed on a reply")
            self.abort(e)

    def _negotiate(self, data: bytes) -> None:
        rest = self._handshake.receive(data)
        out = self._handshake.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
        if self._handshake.done:
            result = self._handshake.result
            self.core = Transmission(structured=result.structured, extended=result.extended)
            if not self.ready.done():
                self.ready.set_result(result)
            if rest:
                self.core.feed(rest)

    def eof_received(self) -> bool | None:
        return None

    def read_directly(self, mover: Mover, flush: Flush | None = None) -> None:
        """From now on read the socket here, not through the transport, so that payloads
        the sinks pass through can be moved by ``mover`` (splice) without being read;
        ``flush`` is called after each wake-up's reads."""
        assert self.transport is not None and self.core is not None
        sock = self.transport.get_extra_info("socket")
        self._direct = socket.socket(fileno=os.dup(sock.fileno()))
        self._direct.setblocking(False)
        self._mover = mover
        self._flush = flush
        self.transport.pause_reading()
        self.core.passthrough = True
        self.resume_reading()

    def write_directly(self, wake: Callable[[], None]) -> bool:
        """From now on write requests to the socket here, so that payloads can be spliced
        into it (False, nothing changed, while the transport still holds bytes)."""
        transport = self.transport
        if self.closed is not None or transport is None or transport.get_write_buffer_size():
            return False
        self.writer = DirectWriter(
            transport.get_extra_info("socket"),
            on_drained=wake,
            on_pressure=lambda high: None,  # bounded by the caller: headers and its pipe
            on_failed=lambda e: self.abort(ConnectionClosed(f"writing to the server: {e}")),
        )
        self._wake = wake
        return True

    def send(self, items: Sequence[bytes]) -> None:
        if self.writer is not None:
            self.writer.write(items)
        elif self.transport is not None:
            self.transport.writelines(items)

    def resume_reading(self) -> None:
        if self._direct is not None and not self._reading and self.closed is None:
            self._reading = True
            asyncio.get_running_loop().add_reader(self._direct.fileno(), self._readable)

    def _pause_reading(self) -> None:
        if self._reading and self._direct is not None:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self._direct.fileno())

    def _readable(self) -> None:
        try:
            self._read_some()
        finally:
            if self._flush is not None:
                self._flush()

    def _read_some(self) -> None:
        core, sock, mover = self.core, self._direct, self._mover
        assert core is not None and sock is not None and mover is not None
        peek = self._peek
        try:
            for _ in range(DIRECT_READS_PER_WAKEUP):
                if core.passing:
                    wanted = core.passing
                    n = mover(sock.fileno(), wanted)
                    if n is None:
                        self._pause_reading()
                        return
                    if n:
                        core.passed(n)
                elif (
                    core.verbatim
                    and core.reads
                    and sock.recv_into(peek, _PEEK, socket.MSG_PEEK) == _PEEK
                    and core.peeked(peek)
                ):
                    continue  # the whole reply is moved from the next round on
                else:
                    buffer = core.get_buffer()
                    wanted = len(buffer)
                    n = sock.recv_into(buffer)
                    if n:
                        core.buffer_updated(n)
                if not n:
                    self.abort(ConnectionClosed("server closed the connection"))
                    return
                if self._drained is not None and not len(core):
                    self._drained.set_result(None)
                    self._drained = None
                if self.closed is not None or n < wanted:
                    # Less than asked for: the socket is (almost always) empty now; the
                    # next wake-up goes on, without a read that would only fail.
                    return
        except BlockingIOError:
            pass
        except (ProtocolError, ReplyError) as e:
            self.abort(e)
        except OSError as e:
            self.abort(ConnectionClosed(f"reading from the server: {e}"))
        except Exception as e:  # a bug must not leave callers waiting forever
            log.exception("NBD client failed on a reply")
            self.abort(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc or ConnectionClosed("server closed the connection"))

    def abort(self, error: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._lose(error)

    def _lose(self, error: BaseException) -> None:
        if self.closed is None:
            self.closed = error
        if self._direct is not None:
            self._pause_reading()
            self._direct.close()
            self._direct = None
        if self.writer is not None and not self.writer.closed:
            self.writer.close()
            if self._wake is not None:
                asyncio.get_running_loop().call_soon(self._wake)
        if not self.ready.done():
            self.ready.set_exception(
                error if isinstance(error, NBDError) else ConnectionClosed(str(error))
            )
        if self.core is not None:
            self.core.fail_all(ConnectionClosed(f"connection lost: {self.closed}"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


async def _open(address: Address, handshake: Handshake) -> _Link:
    loop = asyncio.get_running_loop()
    link = _Link(handshake)
    if address.kind == "unix":
        await loop.create_unix_connection(lambda: link, address.path)
    else:
        await loop.create_connection(lambda: link, address.host, address.port)
    try:
        await link.ready
    except BaseException:
        if link.transport is not None:
            link.transport.abort()
        raise
    return link


class _Collect:
    """A sink that gathers a READ into one buffer (holes left zero) for a future."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.buffer: bytearray | None = None
        self.extents: dict[int, list[Extent]] = {}
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pass_data(self, offset: int, length: int, last: bool, error: ReplyError | None) -> bool:
        return False

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        return False

    def data_buffer(self, offset: int, length: int) -> memoryview:
        if self.buffer is None:
            self.buffer = bytearray(self.length)
        start = offset - self.offset
        return memoryview(self.buffer)[start : start + length]

    def data(self, offset: int, length: int) -> None:
        pass

    def hole(self, offset: int, length: int) -> None:
        pass

    def block_status(self, context_id: int, extents: list[Extent]) -> None:
        self.extents[context_id] = extents

    def done(self, error: ReplyError | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(None)


class NBDClient:
    """A connection in transmission phase on one export."""

    def __init__(self, link: _Link, export: str, negotiated: Negotiated) -> None:
        assert link.core is not None
        self._link = link
        self._core = link.core
        self.export = export
        self.size = negotiated.size
        self.flags = negotiated.flags
        self.structured = negotiated.structured
        self.extended = negotiated.extended
        self.contexts = negotiated.contexts
        self._cookies = itertools.count(1)
        self._corked: list[bytes] | None = None
        self._corked_payloads = False

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
        handshake = Handshake(export, contexts=contexts, structured=structured, extended=extended)
        link = await _open(address, handshake)
        return cls(link, export, link.ready.result())

    @staticmethod
    async def list_exports(address: Address) -> list[tuple[str, str]]:
        """``(name, description)`` of every export, by NBD_OPT_LIST."""
        link = await _open(address, Handshake(None))
        assert link.transport is not None
        link.transport.close()
        return link.ready.result().exports

    @property
    def closed(self) -> bool:
        return self._link.closed is not None

    def read_directly(self, mover: Mover, flush: Flush | None = None) -> None:
        """Read replies from the socket itself, and let ``mover`` move the data payloads
        that sinks pass through (see :meth:`ReplySink.pass_data`); ``flush`` after each
        wake-up's reads."""
        self._link.read_directly(mover, flush)

    def move_verbatim(self) -> None:
        """Peek at each reply's first bytes and let the mover move whole replies as they
        came, header included, when their sinks take them (:meth:`ReplySink.pass_reply`);
        only with :meth:`read_directly`, on a link with structured, compact replies."""
        assert self._link._direct is not None and self.structured and not self.extended
        self._core.verbatim = True

    def resume_reading(self) -> None:
        """The mover can take bytes again."""
        self._link.resume_reading()

    def write_directly(self, wake: Callable[[], None]) -> bool:
        """Write requests to the socket itself from now on, so that a WRITE's payload can
        be spliced in behind its header (:meth:`begin_write`); ``wake`` is called when
        payload bytes queued (:attr:`pipe_bytes`) have left, or the link is gone. False,
        nothing changed, when that cannot be now."""
        return self._link.write_directly(wake)

    def begin_write(
        self, flags: int, offset: int, length: int, sink: ReplySink, cookie: int
    ) -> None:
        """Send a WRITE's header whose ``length`` bytes of payload the caller sends next
        with :meth:`write_payload`, then :meth:`end_write`; nothing else goes out in
        between. Only with :meth:`write_directly`. Raises ConnectionClosed as submit."""
        link = self._link
        writer = link.writer
        assert writer is not None and self._corked is None
        if link.closed is not None or writer.closed:
            raise ConnectionClosed(f"connection closed: {link.closed}")
        if cookie in self._core:
            cookie = next(self._cookies)
            while cookie in self._core:
                cookie = next(self._cookies)
        flags &= ~_PAYLOAD_LEN
        if self.extended:
            flags |= _PAYLOAD_LEN
        header = self._core.request(cookie, Command.WRITE, flags, offset, length, sink)
        writer.open_stream()
        writer.stream((header,))

    def write_payload(self, fd: int, length: int) -> None:
        """``length`` bytes of the WRITE begun, waiting in the pipe ``fd``."""
        writer = self._link.writer
        assert writer is not None
        if not writer.closed:
            writer.stream_pipe(fd, length)

    def end_write(self) -> None:
        writer = self._link.writer
        assert writer is not None
        if not writer.closed:
            writer.close_stream()

    @property
    def pipe_bytes(self) -> int:
        """Payload bytes handed to :meth:`write_payload` that have not left yet."""
        writer = self._link.writer
        return writer.pipe_bytes if writer is not None else 0

    # -- requests -------------------------------------------------------------------------

    def submit(
        self,
        command: int,
        flags: int,
        offset: int,
        length: int,
        sink: ReplySink,
        cookie: int | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Send a request whose reply goes to ``sink``; ``cookie`` is used unless it is in
        flight already; ``payload`` follows a WRITE's header. Raises ConnectionClosed once
        the connection is gone."""
        if self._link.closed is not None:
            raise ConnectionClosed(f"connection closed: {self._link.closed}")
        if cookie is None or cookie in self._core:
            cookie = next(self._cookies)
            while cookie in self._core:
                cookie = next(self._cookies)
        # PAYLOAD_LEN belongs to this link's header form, not to the request it carries on.
        flags &= ~_PAYLOAD_LEN
        if payload is not None and self.extended:
            flags |= _PAYLOAD_LEN
        self._write(self._core.request(cookie, command, flags, offset, length, sink))
        if payload:
            self._corked_payloads = self._corked is not None
            self._write(payload)

    def forward(self, data: bytes, reads: Sequence[tuple[int, int, int, ReplySink]]) -> bool:
        """Send READs as another client wrote them: ``data`` is their requests, in this
        connection's header form, and ``reads`` says ``(cookie, offset, length, sink)`` of
        each. False, with nothing sent, when a cookie is in flight already. Raises
        ConnectionClosed once the connection is gone."""
        if self._link.closed is not None:
            raise ConnectionClosed(f"connection closed: {self._link.closed}")
        if not self._core.forwarded(reads):
            return False
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        """Requests' bytes: held while corked, else written."""
        if self._corked is not None:
            self._corked.append(data)
        else:
            self._link.send((data,))

    def cork(self) -> None:
        """Hold requests until :meth:`uncork`, to send a burst in one write."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self._link.closed is None and self._link.transport is not None:
            if self._corked_payloads:
                # WRITE payloads: handed over as they are, not copied into one buffer.
                self._link.send(corked)
            else:
                self._link.send((b"".join(corked),))
        self._corked_payloads = False

    async def _call(
        self, command: int, flags: int, offset: int, length: int, payload: bytes | None = None
    ) -> _Collect:
        sink = _Collect(offset, length)
        self.submit(command, flags, offset, length, sink, payload=payload)
        await sink.future
        return sink

    async def write(self, offset: int, data: bytes, *, flags: int = 0) -> None:
        await self._call(Command.WRITE, flags, offset, len(data), bytes(data))

    async def write_zeroes(self, offset: int, length: int, *, flags: int = 0) -> None:
        await self._call(Command.WRITE_ZEROES, flags, offset, length)

    async def trim(self, offset: int, length: int, *, flags: int = 0) -> None:
        await self._call(Command.TRIM, flags, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self._call(Command.CACHE, 0, offset, length)

    async def read(self, offset: int, length: int, *, flags: int = 0) -> bytearray:
        sink = await self._call(Command.READ, flags, offset, length)
        return sink.buffer if sink.buffer is not None else bytearray(length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        flags = CommandFlag.REQ_ONE if req_one else 0
        sink = await self._call(Command.BLOCK_STATUS, flags, offset, length)
        return {self.contexts.get(cid, str(cid)): ext for cid, ext in sink.extents.items()}

    async def flush(self) -> None:
        await self._call(Command.FLUSH, 0, 0, 0)

    async def request(self, command: int, flags: int, offset: int, length: int) -> None:
        """Any payload-less request, for tests that probe error handling."""
        await self._call(command, flags, offset, length)

    def abort(self) -> None:
        """Close at once; requests in flight fail."""
        self._link.abort(ConnectionClosed("closed by client"))

    async def close(self) -> None:
        """NBD_CMD_DISC after outstanding requests, then close."""
        link = self._link
        if link.closed is None and len(self._core):
            link._drained = asyncio.get_running_loop().create_future()
            await link._drained
        transport = link.transport
        if link.closed is None and transport is not None:
            link.send((self._core.disconnect(),))
            link.closed = ConnectionClosed("closed by client")
            transport.close()
        if transport is not None and not transport.is_closing():
            transport.abort()
