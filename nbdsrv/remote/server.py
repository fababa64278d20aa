"""The control protocol over TLS on TCP (``--remote tcp:HOST:PORT``), for backup servers.

The port speaks TLS (1.2 or later) from the first byte, and every client must present a
certificate the daemon's ``--tls-ca`` signed. Requests and answers are the control socket's
(control.py: one JSON object a line), limited to the VMs the certificate is granted
(grants.py). Every request and refusal is logged to ``nbdsrv.audit`` with the subject.

Limits against slow and hostile clients, each connection being its own task:

- at most ``max_connections`` connections in the TLS handshake: a new one pushes out the
  oldest (so a flood of silent connections never keeps a real client out), and each has
  ``handshake_timeout`` seconds to finish;
- at most ``max_connections`` clients past the handshake; more are answered ``limit``;
- a request line of at most MAX_REQUEST bytes (``limit``, then the connection closes), read
  one at a time: the next is left in the kernel until the answer is written;
- ``idle_timeout`` seconds (REMOTE_IDLE_TIMEOUT when the daemon's is 0, "never") for the next
  request line to arrive whole and for each answer to be taken by the client.

    accept ──▶ pending (reading paused) ──start_tls──▶ client ──▶ line ▶ answer ▶ line …
                 │ oldest pushed out / timeout          │ limit / idle / EOF
                 ▼                                       ▼
               closed, audited                         closed, audited
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from ..control import Handler, answer, control_peer, error_response
from ..errors import LimitError, NbdsrvError
from ..net.access import Peer, subject_of
from ..net.address import Address
from ..operations import Operation
from .grants import Grants, RemoteView

log = logging.getLogger(__name__)
audit = logging.getLogger("nbdsrv.audit")

# A request line (requests are small; answers may be larger, status of a big daemon).
MAX_REQUEST = 1024 * 1024
# The idle timeout of remote control clients when the daemon's --idle-timeout is 0.
REMOTE_IDLE_TIMEOUT = 300.0
# After refusing a request line that is too long: how long the rest is read and dropped, so
# that the client reads the answer instead of a reset.
LINGER = 2.0


@dataclass(frozen=True)
class RemoteLimits:
    max_connections: int  # 0: no limit
    handshake_timeout: float  # 0: none
    idle_timeout: float  # 0: REMOTE_IDLE_TIMEOUT

    @property
    def idle(self) -> float:
        return self.idle_timeout or REMOTE_IDLE_TIMEOUT


class _Accepted(asyncio.Protocol):
    """A new TCP connection: reading stays paused until TLS takes the transport over, so
    that no byte of the client's hello is read as anything else."""

    def __init__(self, server: RemoteControlServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport's kind
        tcp.pause_reading()
        self._server.accepted(tcp)


class _Lines(asyncio.Protocol):
    """The request lines of one TLS connection, one at a time, each at most ``limit`` bytes;
    and writing with the client's flow control."""

    def __init__(self, limit: int) -> None:
        self.transport: asyncio.Transport | None = None
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0
        self._lines: deque[bytes] = deque()
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        self.overrun = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n", self._scanned)) >= 0:
            self._lines.append(bytes(self._buffer[: end + 1]))
            del self._buffer[: end + 1]
            self._scanned = 0
        self._scanned = len(self._buffer)
        if len(self._buffer) > self._limit:
            self.overrun = True
            self._buffer.clear()
        if (self._lines or self.overrun) and self.transport is not None:
            self.transport.pause_reading()  # the next request waits in the kernel
        self._arrived.set()

    def eof_received(self) -> bool:
        self.closed = True
        self._arrived.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._arrived.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def next_line(self) -> bytes | None:
        """The next request line; None at the end; LimitError for one too long."""
        assert self.transport is not None
        while not self._lines:
            if self.overrun:
                raise LimitError(f"request line longer than {self._limit} bytes")
            if self.closed:
                return None
            self._arrived.clear()
            self.transport.resume_reading()
            await self._arrived.wait()
        return self._lines.popleft()

    async def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.closed:
            return
        self.transport.write(data)
        await self._writable.wait()

    async def drop_input(self, seconds: float) -> None:
        """Read and drop what the client still sends, for at most ``seconds``."""
        assert self.transport is not None
        self.overrun = False
        self._lines.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.closed:
                    self._buffer.clear()
                    self._arrived.clear()
                    self.transport.resume_reading()
                    await self._arrived.wait()


class RemoteControlServer:
    def __init__(
        self,
        address: Address,
        context: ssl.SSLContext,
        grants: Grants,
        handlers: dict[str, Handler],
        limits: RemoteLimits,
    ) -> None:
        self.address = address
        self._context = context
        self._grants = grants
        self._handlers = handlers
        self._limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._pending: dict[asyncio.Transport, None] = {}  # oldest first
        self._clients: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Accepted(self), self.address.host, self.address.port, reuse_address=True
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = Address("tcp", host=host, port=port)
        log.info("remote control on %s (TLS)", self.address)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for transport in [*self._pending, *self._clients]:
            transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def accepted(self, transport: asyncio.Transport) -> None:
        limit = self._limits.max_connections
        if limit and len(self._pending) >= limit:
            oldest = next(iter(self._pending))
            audit.warning(
                "remote control: dropped %s in the TLS handshake (%d connections in it)",
                _address(oldest),
                limit,
            )
            self._pending.pop(oldest)
            oldest.abort()
        self._pending[transport] = None
        task = asyncio.get_running_loop().create_task(self._serve(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, transport: asyncio.Transport) -> None:
        address = _address(transport)
        lines = _Lines(MAX_REQUEST)
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport,
                lines,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._limits.handshake_timeout or None,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as e:
            reason = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            audit.warning("remote control: refused %s: TLS handshake failed: %s", address, reason)
            transport.abort()
            return
        finally:
            self._pending.pop(transport, None)
        if tls is None:  # the connection went while the handshake finished
            transport.abort()
            return
        lines.connection_made(tls)
        peer = Peer(address, subject_of(tls.get_extra_info("peercert")))
        who = f"subject={peer.subject_text()} addr={address}"
        control_peer.set(who)  # this task's context: the audit lines of the handlers
        limit = self._limits.max_connections
        if limit and len(self._clients) >= limit:
            await self._refuse(lines, who, LimitError(f"too many remote control clients ({limit})"))
            tls.close()
            return
        self._clients.add(tls)
        audit.info("remote control: connected %s", who)
        try:
            await self._conversation(lines, grants_view=self._grants.view(peer), who=who)
        finally:
            self._clients.discard(tls)
            tls.close()

    async def _conversation(self, lines: _Lines, grants_view: RemoteView, who: str) -> None:
        idle = self._limits.idle
        while True:
            try:
                async with asyncio.timeout(idle):
                    line = await lines.next_line()
            except TimeoutError:
                audit.info("remote control: closed %s: idle for %g s", who, idle)
                return
            except LimitError as e:
                await self._refuse(lines, who, e)
                await lines.drop_input(LINGER)
                return
            if line is None:
                audit.info("remote control: %s disconnected", who)
                return
            response = await _Request(grants_view, self._handlers).answer(line, who)
            try:
                async with asyncio.timeout(idle):
                    await lines.write(json.dumps(response).encode() + b"\n")
            except TimeoutError:
                audit.info("remote control: closed %s: answer not taken for %g s", who, idle)
                return

    async def _refuse(self, lines: _Lines, who: str, error: NbdsrvError) -> None:
        audit.warning("remote control: refused %s: %s", who, error)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._limits.idle):
                await lines.write(json.dumps(error_response(error)).encode() + b"\n")


class _Request:
    """One remote request: checked against the grants, carried out, filtered, audited."""

    def __init__(self, view: RemoteView, handlers: dict[str, Handler]) -> None:
        self._view = view
        self._handlers = handlers
        self._op = "-"
        self._details = "-"
        self._refused = True  # until the grants let it through

    async def answer(self, line: bytes, who: str) -> dict[str, Any]:
        response = await answer(line, self._dispatch)
        if response["ok"]:
            audit.info("remote control: %s %s by %s: ok", self._op, self._details, who)
            return response
        error = response["error"]
        audit.warning(
            "remote control: %s %s %s by %s: %s: %s",
            "refused" if self._refused else "failed",
            self._op,
            self._details,
            who,
            error["code"],
            error["message"],
        )
        return response

    async def _dispatch(self, op: Operation, args: dict[str, Any]) -> Any:
        self._op = op.name
        given = [f"{k}={v}" for k, v in args.items() if v is not None and v is not False]
        self._details = " ".join(given) or "-"
        self._view.check(op, args)
        self._refused = False
        return self._view.filter(op, await self._handlers[op.name](args))


def _address(transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    return str(peername[0]) if peername else "?"
