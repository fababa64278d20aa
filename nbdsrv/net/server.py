"""The NBD server on asyncio: one protocol object per client around the sans-I/O core."""

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exports.catalog import ExportCatalog
from ..exports.export import Export, ExportGone, Segment
from ..proto.constants import Command, Errno
from ..proto.errors import NBDError, ProtocolError, nbd_errno
from ..proto.extents import StatusSource
from ..proto.server import (
    Disconnect,
    Negotiated,
    Request,
    ServerConnection,
    StartTLS,
    TLSMode,
    extent_limit,
)
from .access import AccessPolicy, Peer, subject_of
from .address import Address
from .direct_writer import DirectWriter, Item, zero_copy_available
from .fast_paths import MAX_POLL_BACKOFF, POLL_BURST, POLL_READ, status_sources
from .flow_control import MAX_BUFFERED, MAX_IN_FLIGHT, reading_full, request_cost
from .limits import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, POLL_WINDOW
from .relay import ReadRelay
from .socket_path import clear_stale_socket

log = logging.getLogger(__name__)

audit = logging.getLogger("nbdsrv.audit")

# asyncio's default of 100 refuses a burst of clients (EAGAIN on a unix socket) before the
# event loop gets to accept them; the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024
UNIX_SEND_BUFFER = 4 * 1024 * 1024


# Requests of a writable export that go over the connection's upstream link like READs.
_RELAYED_WRITES = frozenset(
    (Command.WRITE, Command.WRITE_ZEROES, Command.TRIM, Command.FLUSH, Command.CACHE)
)
# Enum's .name is a property lookup: too slow for every request.
_COMMAND_NAMES = {command: command.name for command in Command}


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        return f"[{self.extra['peer']}] {msg}", kwargs


@dataclass(frozen=True)
class ServerPolicy:
    """TLS, access rules and the limits that keep one client from exhausting the daemon."""

    tls: TLSMode = TLSMode.OFF
    tls_context: ssl.SSLContext | None = None
    access: AccessPolicy = field(default_factory=AccessPolicy)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # 0: no limit
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT  # negotiation incl. TLS; 0: none
    idle_timeout: float = 0.0  # transmission with nothing to do; 0: none
    max_in_flight: int = MAX_IN_FLIGHT
    max_buffered: int = MAX_BUFFERED
    # Plain connections write their replies themselves (sendfile, splice); False: all
    # through the event loop's transport, as TLS connections always do.
    zero_copy: bool = True
    # After a block status answered at once, wait this long (seconds) for the client's next
    # request before going back to the event loop (NBDConnection._poll); 0: never.
    poll_window: float = POLL_WINDOW


class _AllowedExports:
    """The catalog as one connection may see it: exports its peer is not allowed to use are
    absent (not listed, unknown to GO/INFO/EXPORT_NAME), so their names are not revealed."""

    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        self._catalog = connection._server.catalog
        self._access = connection._server.policy.access

    def find_export(self, name: str) -> Export | None:
        export = self._catalog.find_export(name)
        if export is None:
            return None
        if not self._access.allowed(name, self._connection.peer):
            self._connection.denied(name)
            return None
        return export

    def list_exports(self) -> Sequence[Export]:
        peer = self._connection.peer
        return [e for e in self._catalog.list_exports() if self._access.allowed(e.name, peer)]


class NBDConnection(asyncio.Protocol):
    """One client, from greeting to close.

    Memory per connection is bounded: the core buffers at most one option (1 MiB) or one
    read burst; at most ``max_in_flight`` requests are parsed and not yet answered; requests
    start only while the replies they may produce plus the unsent output stay within
    ``max_buffered`` (one request always may start when nothing else is in flight); reading
    stops whenever any of these is reached.
    """

    def __init__(self, server: "NBDServer") -> None:
        self._server = server
        self._policy = server.policy
        self._core = ServerConnection(_AllowedExports(self), server.policy.tls)
        self._transport: asyncio.Transport | None = None
        self._raw_transport: asyncio.Transport | None = None
        # Writes replies once in transmission on a plain socket (see direct_writer).
        self._writer: DirectWriter | None = None
        # Protocol objects are made by the running loop; keep it (each lookup costs a getpid).
        self._loop = asyncio.get_running_loop()
        self._export: Export | None = None
        self._contexts: list[tuple[int, str]] = []
        # Every negotiated context answered from memory: block status straight from data_received.
        self._sources: list[tuple[int, StatusSource]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # READs relayed to an upstream connection of this connection's own (session exports):
        # no task each; counted here until their reply is written.
        self._relay: ReadRelay | None = None
        self._relayed = 0
        self._attaching: asyncio.Task[None] | None = None
        self._upstream_wanted = False
        # What read() returned for replies written but maybe not sent yet (Export.release).
        self._in_transit: list[list[Segment]] = []
        self._pending: deque[Request] = deque()
        self._in_flight_bytes = 0
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._tls_handshake = False
        self._continue_scheduled = False
        self._lost_done = False
        self._counted = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._started = self._loop.time()
        self._last_activity = self._started
        self._reason = ""
        # Answers that skip polling for the next request (_poll), and how many the next
        # empty window makes skip.
        self._poll_skip = 0
        self._poll_backoff = 1
        self.log: logging.LoggerAdapter = ConnectionLog(log, {"peer": "?"})  # type: ignore[type-arg]
        self.peer = Peer(None)
        self.peer_text = "?"
        self.bytes_served = 0
        self.requests = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._raw_transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = Peer(str(peername[0]))
            self.peer_text = f"{peername[0]}:{peername[1]}"
        else:
            self.peer_text = f"unix:{transport.get_extra_info('sockname') or '?'}"
        self.log = ConnectionLog(log, {"peer": self.peer_text})
        limit = self._policy.max_connections
        if limit and len(self._server.connections) >= limit:
            self._reason = f"refused: {limit} connections already (--max-connections)"
            self.log.warning("%s", self._reason)
            transport.close()
            return
        self._counted = True
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None and sock.family == socket.AF_UNIX:
            # The default unix send buffer (~208 KiB) holds less than one 256 KiB read
            # reply: the client then wakes up for every fragment. TCP tunes itself.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        self._server.connections.add(self)
        if self._policy.handshake_timeout > 0:
            self._handshake_timer = self._loop.call_later(
                self._policy.handshake_timeout, self._handshake_expired
            )
        self.log.debug("connected")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._taken(data) and self._policy.poll_window:
            if self._poll_skip:
                self._poll_skip -= 1
            else:
                self._poll()
        self._last_activity = self._loop.time()  # after: the reply goes out first

    def _taken(self, data: bytes) -> bool:
        """Handle received bytes; True when they were block status answered at once."""
        relay = self._relay
        if relay is not None and relay.forwards and self._forwarded_at_once(relay, data):
            return False
        if self._sources is not None and self._answered_at_once(data):
            return True
        self._receive(data)
        return False

    def _poll(self) -> None:
        """Wait briefly for the next request of a client that asks one thing at a time,
        reading the socket directly, instead of sleeping in the event loop: the wake-up
        costs more than the wait (the adaptive polling of QEMU's IOThreads, for the same
        reason). A window that passes with nothing makes the next answers skip polling,
        1, 2, 4 … up to 64 of them while windows keep passing empty, so a client that is
        slower than the window costs almost nothing. After POLL_BURST reads the event loop
        gets its turn (the next request then comes through it)."""
        writer = self._writer
        if writer is None:
            return
        window = self._policy.poll_window
        for _ in range(POLL_BURST):
            if writer.closed or self._reading_paused:
                return  # the request failed the connection, or no more may be read now
            deadline = time.perf_counter() + window
            while True:
                try:
                    data = os.read(writer.fd, POLL_READ)
                    break
                except BlockingIOError:
                    if time.perf_counter() >= deadline:
                        self._poll_skip = self._poll_backoff
                        self._poll_backoff = min(2 * self._poll_backoff, MAX_POLL_BACKOFF)
                        return
                except OSError:
                    return  # the transport sees it too, and says why
            self._poll_backoff = 1
            if not data or not self._taken(data) or self._lost_done:
                return  # an end of file stays for the transport to see

    def eof_received(self) -> bool | None:
        self._reason = self._reason or "client closed the connection"
        self._closing = True
        self._pump()
        self._close_when_idle()
        # Keep the socket half-open to finish replies; TLS transports close on EOF anyway.
        return None if self._core.tls else True

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._pump()

    def shut_down(self) -> None:
        """Server stopping: requests in flight finish, later ones get ESHUTDOWN, then close."""
        self._reason = self._reason or "server stopping"
        self._closing = True
        if self._export is None:
            self._abort()
        self._close_when_idle()

    def force_close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for transport in (self._transport, self._raw_transport):
            if transport is not None:
                transport.abort()

    def denied(self, export: str) -> None:
        """The peer asked for an export its allow rules do not admit."""
        audit.warning(
            "access denied: peer=%s export=%s subject=%s",
            self.peer_text,
            _quote(export),
            _quote(self.peer.subject_text() or "-"),
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _lost(self, exc: BaseException | None) -> None:
        if self._lost_done:
            return
        self._lost_done = True
        for timer in (self._handshake_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._pending.clear()
        for task in self._tasks:
            task.cancel()
        if self._attaching is not None:
            self._attaching.cancel()
        if self._relay is not None:
            self._relay.close()
        if self._writer is not None:
            self._writer.close()
        self._release_sent()  # or never to be sent now
        reason = self._reason or (f"connection lost: {exc}" if exc else "closed")
        if not self._counted:
            audit.info("connection closed: peer=%s %s", self.peer_text, _quote(reason))
            return
        self._server.connections.discard(self)
        if self._export is not None:
            self._export.clients -= 1
        audit.info(
            "connection closed: peer=%s export=%s tls=%s subject=%s bytes=%d requests=%d "
            "duration=%.3fs reason=%s",
            self.peer_text,
            _quote(self._export.name if self._export is not None else "-"),
            "yes" if self._core.tls else "no",
            _quote(self.peer.subject_text() or "-"),
            self.bytes_served,
            self.requests,
            self._loop.time() - self._started,
            _quote(reason),
        )

    def _receive(self, data: bytes) -> None:
        room = self._policy.max_in_flight - self._busy() - len(self._pending)
        try:
            events = self._core.receive(data, max(room, 0))
        except ProtocolError as e:
            self._reason = f"protocol error: {e}"
            self.log.warning("protocol error, closing: %s", e)
            self._flush()
            self._abort()
            return
        self._flush()
        for event in events:
            if isinstance(event, Request):
                self.requests += 1
                self._pending.append(event)
                if self._upstream_wanted and (
                    event.command == Command.READ
                    or (self._core.writable and event.command in _RELAYED_WRITES)
                ):
                    self._upstream_wanted = False
                    assert self._export is not None
                    self._attaching = self._loop.create_task(self._attach(self._export))
            elif isinstance(event, Negotiated):
                self._negotiated(event)
            elif isinstance(event, StartTLS):
                self._start_tls()
            elif isinstance(event, Disconnect):
                self.log.debug("%s", event.reason)
                self._reason = event.reason
                self._closing = True
        self._pump()
        self._close_when_idle()

    def _answered_at_once(self, data: bytes) -> bool:
        """Block status of in-memory contexts answered straight from the received bytes when
        they hold only such requests and nothing else waits: no Request, no _pump; the
        general path would send the same replies."""
        export = self._export
        assert export is not None and self._sources is not None
        if (
            self._pending
            or self._writing_paused
            or self._closing
            or export.closed
            or self._server.stopping
            or export.broken() is not None
        ):
            return False
        answered = self._core.answer_status(data, self._sources)
        if answered is None:
            return False
        reply, count = answered
        self._send(reply)
        self.requests += count
        if self._server.on_request is not None:
            for _ in range(count):
                self._server.on_request(export.name, "BLOCK_STATUS", 0)
        return True

    def _forwarded_at_once(self, relay: ReadRelay, data: bytes) -> bool:
        """Plain READs relayed straight from the received bytes when they hold only such
        requests, nothing else waits and the limits leave room for all of them: no event,
        no _pump; the general path would relay the same requests."""
        if self._pending or self._writing_paused or self._closing or self._server.stopping:
            return False
        requests = self._core.read_requests(data)
        if requests is None:
            return False
        count = len(requests)
        busy = self._busy() + count
        if busy > self._policy.max_in_flight:
            return False
        cost = sum(request.length for request in requests)
        if not self._within_budget(cost, count):
            return False
        if not relay.forward(data, requests):
            return False
        self.requests += count
        self._relayed += count
        self._in_flight_bytes += cost
        if busy >= self._policy.max_in_flight:
            self._update_reading()
        return True

    def _pump(self) -> None:
        """Start what may start, parse what is buffered when there is room, and read only
        when every bound leaves room."""
        if self._lost_done:
            return
        if self._pending:
            relay = self._relay
            if relay is not None:
                relay.cork()  # the requests started now go upstream in one write
            while self._pending and self._may_start(self._pending[0]):
                self._start(self._pending.popleft())
            if relay is not None:
                relay.uncork()
        room = self._policy.max_in_flight - self._busy() - len(self._pending)
        if self._core.backlog and room > 0 and not self._continue_scheduled:
            self._continue_scheduled = True
            self._loop.call_soon(self._continue)
        if self._transport is not None and not self._transport.is_closing():
            self._update_reading()

    def _continue(self) -> None:
        self._continue_scheduled = False
        if not self._lost_done and self._core.backlog:
            self._receive(b"")

    def _busy(self) -> int:
        return len(self._tasks) + self._relayed

    def _may_start(self, request: Request) -> bool:
        if self._writing_paused or self._attaching is not None:
            return False
        return self._within_budget(request_cost(request))

    def _within_budget(self, cost: int, count: int = 1) -> bool:
        """Whether ``count`` requests whose replies may hold ``cost`` bytes fit the memory
        budget beside what is in flight and unsent; one request may always start when
        nothing else runs."""
        if count == 1 and not self._busy():
            return True
        return self._in_flight_bytes + cost + self._unsent() <= self._policy.max_buffered

    def _unsent(self) -> int:
        if self._writer is not None:
            return self._writer.buffered
        assert self._transport is not None
        return self._transport.get_write_buffer_size()

    def _flush(self) -> None:
        out = self._core.data_to_send()
        if out:
            self._output([out])

    def _output(self, items: Sequence[Item]) -> None:
        """Every byte to the client goes out here, in order."""
        if self._writer is not None:
            self._writer.write(items)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(items)  # type: ignore[arg-type]  # no file ranges here

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._transport is not None:
            self._transport.close()

    def _close_when_idle(self) -> None:
        # Requests received before the close are answered first (spec: DISC lets outstanding
        # requests finish), including those not started yet or not parsed yet.
        if (
            self._closing
            and not self._busy()
            and not self._pending
            and not self._core.backlog
            and self._transport is not None
            and (self._writer is None or self._writer.idle)
        ):
            if self._writer is not None:
                self._writer.close()
            self._transport.close()

    def _full(self) -> bool:
        return reading_full(self._busy(), self._policy.max_in_flight, self._reading_paused)

    def _update_reading(self) -> None:
        assert self._transport is not None
        if self._tls_handshake:
            return  # the raw transport belongs to the TLS handshake now
        want_pause = (
            self._writing_paused or bool(self._pending) or self._core.backlog or self._full()
        )
        if want_pause and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused and not self._transport.is_closing():
            self._transport.resume_reading()
            self._reading_paused = False

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self._export is None and not self._lost_done:
            self._reason = (
                f"handshake not finished after {self._policy.handshake_timeout:g} s "
                "(--handshake-timeout)"
            )
            self.log.warning("%s, closing", self._reason)
            self.force_close()
            self._lost(None)

    def _idle_check(self) -> None:
        timeout = self._policy.idle_timeout
        idle = self._loop.time() - self._last_activity
        if self._busy() or self._pending or idle < timeout:
            self._idle_timer = self._loop.call_later(max(timeout - idle, 0.05), self._idle_check)
            return
        self._idle_timer = None
        self._reason = f"idle for {timeout:g} s (--idle-timeout)"
        self.log.info("%s, closing", self._reason)
        self._closing = True
        self._close_when_idle()

    def _start_tls(self) -> None:
        assert self._transport is not None
        # Nothing may reach the core or the TLS layer before start_tls owns the socket: the
        # client's ClientHello must not be taken for NBD bytes.
        self._transport.pause_reading()
        self._reading_paused = True
        self._tls_handshake = True
        task = self._loop.create_task(self._upgrade(self._transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upgrade(self, raw: asyncio.Transport) -> None:
        context = self._policy.tls_context
        assert context is not None
        timeout = self._policy.handshake_timeout or None
        try:
            transport = await self._loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=timeout
            )
        except asyncio.CancelledError:
            raw.abort()
            self._lost(None)
            raise
        except Exception as e:
            self._reason = self._reason or f"TLS handshake failed: {e or type(e).__name__}"
            self.log.warning("%s", self._reason)
            raw.abort()
            self._lost(e)
            return
        if self._lost_done or transport is None:
            if transport is not None:
                transport.abort()
            return
        self._transport = transport
        self._tls_handshake = False
        self._reading_paused = False
        self.peer = Peer(self.peer.address, subject_of(transport.get_extra_info("peercert")))
        self.log.debug("TLS established, subject %s", self.peer.subject_text())
        self._core.tls_established()
        if self._closing:
            self._close_when_idle()
            return
        self._pump()

    def _negotiated(self, event: Negotiated) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._policy.idle_timeout > 0:
            self._idle_timer = self._loop.call_later(self._policy.idle_timeout, self._idle_check)
        export = self._server.catalog.find_export(event.export.name)
        self._export = export
        if export is not None:
            export.clients += 1
        self._contexts = [(c.id, c.name) for c in event.contexts]
        if export is not None and self._contexts:
            self._sources = status_sources(export, self._contexts, event.extended)
        self.log = ConnectionLog(log, {"peer": f"{self.peer_text} {event.export.name}"})
        self.log.debug(
            "transmission: structured=%s extended=%s tls=%s contexts=%s",
            event.structured,
            event.extended,
            self._core.tls,
            [name for _, name in self._contexts],
        )
        self._take_writes()
        # Opened at the first READ (or write): a client that only maps (nbdinfo, qemu-img
        # map) costs neither nbdsrv nor QEMU an upstream handshake.
        self._upstream_wanted = export is not None and export.relays_reads

    def _take_writes(self) -> None:
        """Write replies directly to a plain socket from now on, when all written before
        has left the transport (it practically always has: the last option reply is small)."""
        transport = self._transport
        if not self._policy.zero_copy or self._core.tls or not zero_copy_available():
            return
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        self._writer = DirectWriter(
            sock,
            on_drained=self._drained,
            on_pressure=self._pressure,
            on_failed=self._write_failed,
        )

    def _drained(self) -> None:
        if self._relay is not None:
            self._relay.writable()
        assert self._writer is not None
        if not self._writer.idle:
            return  # a stream is open: what others wrote waits behind it
        self._release_sent()
        if self._closing:
            self._loop.call_soon(self._close_when_idle)

    def _pressure(self, high: bool) -> None:
        if high:
            self.pause_writing()
        else:
            self.resume_writing()

    def _write_failed(self, error: OSError) -> None:
        self._reason = self._reason or f"writing to the client failed: {error}"
        self.log.debug("%s", self._reason)
        if self._transport is not None:
            self._transport.abort()

    async def _attach(self, export: Export) -> None:
        """Open this connection's own upstream connection; requests wait until then."""
        try:
            upstream = await export.open_upstream()
        except (OSError, NBDError) as e:
            # Reads then go through export.read(), which answers for itself.
            self.log.warning("no upstream connection of its own: %s", e)
            return
        finally:
            self._attaching = None
            self._loop.call_soon(self._pump)
        if self._lost_done:
            upstream.abort()
            return
        self._relay = ReadRelay(
            export,
            upstream,
            self._core,
            self._output,
            self._relayed_done,
            writer=self._writer,
            fatal=self._reply_cut,
        )

    def _reply_cut(self, reason: str) -> None:
        self._reason = reason
        self.log.warning("%s: closing the connection", reason)
        self.force_close()

    def _start(self, request: Request) -> None:
        cost = request_cost(request)
        self._in_flight_bytes += cost
        relay = self._relay
        if relay is not None:
            if request.command == Command.READ:
                self._relayed += 1
                relay.read(request)
                return
            if (
                request.command in _RELAYED_WRITES
                and relay.export.writable
                and relay.takes(request)
            ):
                self._relayed += 1
                relay.command(request)
                return
        if request.command == Command.READ and self._writer is not None and self._read_now(request):
            self._in_flight_bytes -= cost
            return
        if request.command == Command.BLOCK_STATUS:
            reply = self._status_now(request)
            if reply is not None:  # answered from memory: no task
                self._in_flight_bytes -= cost
                self._send(reply)
                return
        task = self._loop.create_task(self._serve(request, cost))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._reason = f"internal error: {task.exception()}"
            self.log.error("request failed unexpectedly", exc_info=task.exception())
            self._abort()
            return
        self._last_activity = self._loop.time()
        self._pump()
        self._close_when_idle()

    def _read_now(self, request: Request) -> bool:
        """Answer a READ at once, with no task, if the export has the data at hand (a file's
        pages in the page cache, sent with sendfile)."""
        export = self._export
        if export is None or export.closed or self._server.stopping:
            return False  # _answer says why
        try:
            segments = export.read_cached(request.offset, request.length)
        except OSError as e:
            self.log.warning("READ at %d+%d failed: %s", request.offset, request.length, e)
            self._send(self._core.error_reply(request, nbd_errno(e), str(e)))
            return True
        if segments is None:
            return False
        self._send_read(request, segments)
        self.bytes_served += request.length
        self._counted_request(export, request, request.length)
        return True

    def _status_now(self, request: Request) -> bytes | None:
        """The block status reply, if every context can answer at once (packed)."""
        export = self._export
        if export is None or export.closed or self._server.stopping:
            return None  # _answer says why
        limit = extent_limit(request.flags)
        extended = self._core.extended
        per_context = []
        try:
            for cid, name in self._contexts:
                packed = export.packed_extents(
                    name, request.offset, request.length, limit, extended=extended
                )
                if packed is None:
                    return None
                per_context.append((cid, packed))
        except OSError as e:
            return self._core.error_reply(request, nbd_errno(e), str(e))
        self._counted_request(export, request, 0)
        return self._core.block_status_reply(request, per_context)

    def _relayed_done(self, request: Request, served: int, error: tuple[Errno, str] | None) -> None:
        self._relayed -= 1
        self._in_flight_bytes -= request_cost(request)
        self.bytes_served += served
        if error is None and self._export is not None:
            self._counted_request(self._export, request, served)
        if error is not None and error[0] != Errno.ESHUTDOWN and not self._refusal_counted():
            self.log.warning(
                "%s at %d+%d failed: %s",
                _COMMAND_NAMES[request.command],
                request.offset,
                request.length,
                error[1],
            )
        self._last_activity = self._loop.time()
        if self._pending or self._core.backlog or (self._reading_paused and not self._full()):
            self._pump()
        if self._closing:
            self._close_when_idle()

    def _refusal_counted(self) -> bool:
        """A failed export counts its refusals and logs them once: no line per request."""
        return self._export is not None and self._export.count_refusal()

    def _send(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.send(data)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _send_read(self, request: Request, segments: list[Segment]) -> None:
        """A READ's reply; ``segments`` go back to the export once it has left."""
        self._output(self._core.read_reply(request, segments))
        self._in_transit.append(segments)
        if not self._unsent():
            self._release_sent()

    def _release_sent(self) -> None:
        """What read() returned for replies that have left goes back to the export (its
        buffers may be used again)."""
        export = self._export
        if export is not None:
            for sent in self._in_transit:
                export.release(sent)
        self._in_transit.clear()

    def _counted_request(self, export: Export, request: Request, read_bytes: int) -> None:
        if self._server.on_request is not None:
            self._server.on_request(export.name, _COMMAND_NAMES[request.command], read_bytes)

    async def _serve(self, request: Request, cost: int) -> None:
        try:
            await self._answer(request)
        finally:
            self._in_flight_bytes -= cost

    async def _answer(self, request: Request) -> None:
        core, export = self._core, self._export
        try:
            if export is None or export.closed or self._server.stopping:
                raise ExportGone()
            if request.command == Command.READ:
                segments = await export.read(request.offset, request.length)
                if export.closed:
                    raise ExportGone()
                self._send_read(request, segments)
                self.bytes_served += request.length
                self._counted_request(export, request, request.length)
                return
            elif request.command == Command.BLOCK_STATUS:
                limit = extent_limit(request.flags)
                per_context = [
                    (cid, await export.extents(name, request.offset, request.length, limit))
                    for cid, name in self._contexts
                ]
                if export.closed:
                    raise ExportGone()
                if not all(extents for _, extents in per_context):
                    raise OSError(errno.EIO, "the export reported no extent")
                self._send(core.block_status_reply(request, per_context))
            else:
                await _write_request(export, request)
                if export.closed:
                    raise ExportGone()
                self._send(core.ok_reply(request))
            self._counted_request(export, request, 0)
        except ExportGone:
            self._send(core.error_reply(request, Errno.ESHUTDOWN, "export is gone"))
        except OSError as e:
            if export is not None and export.closed:
                # Removed while this request waited: its failure is the removal's.
                self._send(core.error_reply(request, Errno.ESHUTDOWN, "export is gone"))
                return
            if not self._refusal_counted():
                self.log.warning(
                    "%s at %d+%d failed: %s",
                    request.command.name, request.offset, request.length, e,
                )  # fmt: skip
            self._send(core.error_reply(request, nbd_errno(e), str(e)))


class NBDServer:
    """Listens on every address and serves the catalog's exports."""

    def __init__(self, catalog: ExportCatalog, policy: ServerPolicy | None = None) -> None:
        self.catalog = catalog
        self.policy = policy or ServerPolicy()
        self.connections: set[NBDConnection] = set()
        self.stopping = False
        # Called for every request answered: (export, command name, bytes read).
        self.on_request: Callable[[str, str, int], None] | None = None
        self._servers: list[asyncio.Server] = []
        self.addresses: list[Address] = []

    async def listen(self, address: Address) -> None:
        loop = asyncio.get_running_loop()
        if address.kind == "unix":
            clear_stale_socket(address.path)  # never another daemon's live socket
            server = await loop.create_unix_server(
                lambda: NBDConnection(self), address.path, backlog=LISTEN_BACKLOG
            )
        else:
            server = await loop.create_server(
                lambda: NBDConnection(self),
                address.host or None,
                address.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
            if address.port == 0:
                port = server.sockets[0].getsockname()[1]
                address = Address("tcp", host=address.host, port=port)
        self._servers.append(server)
        self.addresses.append(address)
        log.info("listening on %s", address)

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new clients, let requests in flight finish, close every connection."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.shut_down()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.force_close()
        for server in self._servers:
            await server.wait_closed()
        for address in self.addresses:
            if address.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(address.path)


async def _write_request(export: Export, request: Request) -> None:
    """A write, zeroes, trim, flush or cache request through the export's own methods (a
    read-only export never gets the first three: the protocol core refuses them)."""
    command, offset, length, flags = request.command, request.offset, request.length, request.flags
    if command == Command.WRITE:
        assert request.data is not None
        await export.write(offset, request.data, int(flags))
    elif command == Command.WRITE_ZEROES:
        await export.write_zeroes(offset, length, int(flags))
    elif command == Command.TRIM:
        await export.trim(offset, length, int(flags))
    elif command == Command.FLUSH:
        await export.flush()
    else:  # CACHE: a hint
        await export.cache(offset, length)
        return
    if command == Command.WRITE or command == Command.WRITE_ZEROES:
        export.write_served(command, offset, length)


def _quote(text: str) -> str:
    """A value for a key=value log line: quoted when it has spaces, quotes or nothing."""
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
