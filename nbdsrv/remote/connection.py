"""One remote control connection: TLS over a memory BIO, and request lines out of it.

TLS is done here (``SSLContext.wrap_bio``) rather than with ``loop.start_tls``: every byte
the client sends goes through one place, so a failed handshake (a certificate of another CA,
an expired one, none) is known at once rather than at the handshake timeout (uvloop 0.23's
``start_tls`` sometimes reports it only then), and a client that speaks plain text is told
so in plain text instead of being left waiting.

Request lines come one at a time: when a whole line is there, reading from the socket
pauses until it has been answered, so a client cannot queue work or memory beyond one line
of at most ``limit`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

# The first byte of every TLS client's first record (a handshake record, RFC 8446 5.1).
TLS_HANDSHAKE_RECORD = 0x16
_READ = 64 * 1024


class NotTLS(Exception):
    """The client's first byte is not a TLS handshake record."""


class RemoteConnection(asyncio.Protocol):
    def __init__(
        self,
        context: ssl.SSLContext,
        limit: int,
        on_connected: Callable[[RemoteConnection], None],
    ) -> None:
        self._on_connected = on_connected
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._limit = limit
        self.transport: asyncio.Transport | None = None
        self._started = False
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._scanned = 0
        self._lines: deque[bytes] = deque()
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        self.overrun = False
        self.error: str | None = None  # why the connection broke, for the audit line

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not of that class
        self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if not self.handshake.done():
            if not self._started and data[:1] != bytes([TLS_HANDSHAKE_RECORD]):
                self.handshake.set_exception(NotTLS())
                self._pause()
                return
            self._started = True
            self._incoming.write(data)
            self._handshake()
            return
        self._incoming.write(data)
        self._decrypt()

    def eof_received(self) -> bool:
        self._end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(str(exc) if exc else None)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # TLS

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as e:
            self._flush()  # the alert that tells the client why
            if not self.handshake.done():
                self.handshake.set_exception(e)
            return
        self._flush()
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._decrypt()  # the first request may have come with the client's last flight

    def _decrypt(self) -> None:
        while True:
            try:
                chunk = self._tls.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._end(None)  # the client's close_notify
                break
            except ssl.SSLError as e:
                self._end(f"TLS error: {e.reason or e}")
                if self.transport is not None:
                    self.transport.abort()
                break
            if not chunk:
                break
            self._take(chunk)
        self._flush()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def peer_certificate(self) -> dict[str, object] | None:
        cert = self._tls.getpeercert()
        return cast(dict[str, object], cert) if cert else None

    # Lines

    def _take(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n", self._scanned)) >= 0:
            self._lines.append(bytes(self._buffer[: end + 1]))
            del self._buffer[: end + 1]
            self._scanned = 0
        self._scanned = len(self._buffer)
        if len(self._buffer) > self._limit:
            self.overrun = True
            self._buffer.clear()
            self._scanned = 0
        if self._lines or self.overrun:
            self._pause()  # the next request waits in the kernel
        self._arrived.set()

    def _pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _end(self, error: str | None) -> None:
        self.closed = True
        self.error = self.error or error
        self._arrived.set()
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionResetError(error or "closed by the client"))

    async def next_line(self) -> bytes | None:
        """The next request line; None at the end. ``overrun`` set: one was too long."""
        assert self.transport is not None
        while not self._lines:
            if self.overrun or self.closed:
                return None
            self._arrived.clear()
            self.transport.resume_reading()
            await self._arrived.wait()
        return self._lines.popleft()

    async def write(self, data: bytes) -> None:
        """Send ``data`` encrypted; returns when the transport can take more."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self._tls.write(data)
        self._flush()
        await self._writable.wait()

    async def drop_input(self, seconds: float) -> None:
        """Read and drop what the client still sends, for at most ``seconds``: it then reads
        our answer rather than a connection reset."""
        assert self.transport is not None
        try:
            async with asyncio.timeout(seconds):
                while not self.closed:
                    self._lines.clear()
                    self._buffer.clear()
                    self._arrived.clear()
                    self.transport.resume_reading()
                    await self._arrived.wait()
        except TimeoutError:
            pass

    def close(self) -> None:
        """close_notify, then close (the transport sends what it holds first)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.handshake.done() and not self.handshake.exception():
            # SSLWantReadError: the client's close_notify is not awaited.
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()
            self._flush()
        self.transport.close()
