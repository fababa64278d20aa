"""The NBD server on asyncio: one protocol object per client around the sans-I/O core."""

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from ..exports.catalog import ExportCatalog
from ..exports.export import Export
from ..proto.server import ServerConnection, TLSMode
from .access import AccessPolicy, Peer
from .address import Address
from .audit import ConnectionLog, audit, quote
from .dispatcher import RequestDispatcher
from .flow_control import MAX_BUFFERED, MAX_IN_FLIGHT, FlowControl
from .handshake import AllowedExports, HandshakePhase
from .limits import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, POLL_WINDOW
from .read_paths import ReadPaths
from .replies import ReplyOutput
from .socket_path import clear_stale_socket
from .status_paths import StatusPaths

log = logging.getLogger(__name__)

# asyncio's default of 100 refuses a burst of clients (EAGAIN on a unix socket) before the
# event loop gets to accept them; the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024
UNIX_SEND_BUFFER = 4 * 1024 * 1024


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
    # request before going back to the event loop (StatusPaths.poll_next); 0: never.
    poll_window: float = POLL_WINDOW


class NBDConnection(asyncio.Protocol):
    """One client, from greeting to close: the asyncio adapter around the protocol core
    (proto/server.py). It holds what the connection is (export, peer, counters, why it
    closes) and wires the units that do the work: the handshake phase (handshake.py), the
    request dispatcher (dispatcher.py), the READ and BLOCK_STATUS paths (read_paths.py,
    status_paths.py), flow control (flow_control.py) and reply writing (replies.py)."""

    def __init__(self, server: "NBDServer") -> None:
        self.server = server
        self.policy = server.policy
        # Protocol objects are made by the running loop; keep it (each lookup costs a getpid).
        self.loop = asyncio.get_running_loop()
        self.core = ServerConnection(AllowedExports(self), server.policy.tls)
        self.export: Export | None = None
        self.log: logging.LoggerAdapter = ConnectionLog(log, {"peer": "?"})  # type: ignore[type-arg]
        self.peer = Peer(None)
        self.peer_text = "?"
        self.bytes_served = 0
        self.requests = 0
        self.reason = ""  # why it closes, for the audit line
        self.closing = False  # requests received are answered, then it closes
        self.lost = False
        self.last_activity = self.started = self.loop.time()
        self._counted = False  # in server.connections (not refused)
        self._idle_timer: asyncio.TimerHandle | None = None
        self.output = ReplyOutput(self)
        self.flow = FlowControl(self)
        self.handshake = HandshakePhase(self)
        self.dispatcher = RequestDispatcher(self)
        self.reads = ReadPaths(self)
        self.status = StatusPaths(self)
        # data_received runs for every request a client maps one at a time: bound once.
        self._received = self.dispatcher.received
        self._poll_window = self.policy.poll_window

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.output.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.output.raw_transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = Peer(str(peername[0]))
            self.peer_text = f"{peername[0]}:{peername[1]}"
        else:
            self.peer_text = f"unix:{transport.get_extra_info('sockname') or '?'}"
        self.log = ConnectionLog(log, {"peer": self.peer_text})
        limit = self.policy.max_connections
        if limit and len(self.server.connections) >= limit:
            self.reason = f"refused: {limit} connections already (--max-connections)"
            self.log.warning("%s", self.reason)
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
        self.server.connections.add(self)
        self.handshake.start()
        self.log.debug("connected")
        self.output.flush()

    def data_received(self, data: bytes) -> None:
        if self._received(data) and self._poll_window:
            self.status.poll_next()
        self.last_activity = self.loop.time()  # after: the reply goes out first

    def eof_received(self) -> bool | None:
        self.reason = self.reason or "client closed the connection"
        self.closing = True
        self.dispatcher.pump()
        self.close_when_idle()
        # Keep the socket half-open to finish replies; TLS transports close on EOF anyway.
        return None if self.core.tls else True

    def pause_writing(self) -> None:
        self.flow.writing_paused = True
        self.flow.update_reading()

    def resume_writing(self) -> None:
        self.flow.writing_paused = False
        self.dispatcher.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.handshake.stop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.dispatcher.pending.clear()
        for task in self.flow.tasks:
            task.cancel()
        self.reads.close()
        self.output.lost()
        reason = self.reason or (f"connection lost: {exc}" if exc else "closed")
        if not self._counted:
            audit.info("connection closed: peer=%s %s", self.peer_text, quote(reason))
            return
        self.server.connections.discard(self)
        if self.export is not None:
            self.export.clients -= 1
        audit.info(
            "connection closed: peer=%s export=%s tls=%s subject=%s bytes=%d requests=%d "
            "duration=%.3fs reason=%s",
            self.peer_text,
            quote(self.export.name if self.export is not None else "-"),
            "yes" if self.core.tls else "no",
            quote(self.peer.subject_text() or "-"),
            self.bytes_served,
            self.requests,
            self.loop.time() - self.started,
            quote(reason),
        )

    # -- closing ------------------------------------------------------------------------------

    def shut_down(self) -> None:
        """Server stopping: requests in flight finish, later ones get ESHUTDOWN, then close."""
        self.reason = self.reason or "server stopping"
        self.closing = True
        if self.export is None:
            self.output.close()
        self.close_when_idle()

    def force_close(self) -> None:
        self.output.force_close()

    def close_when_idle(self) -> None:
        # Requests received before the close are answered first (spec: DISC lets outstanding
        # requests finish), including those not started yet or not parsed yet.
        if (
            self.closing
            and not self.flow.busy()
            and not self.dispatcher.pending
            and not self.core.backlog
            and self.output.transport is not None
            and self.output.idle
        ):
            self.output.close()

    def start_idle_timer(self) -> None:
        if self.policy.idle_timeout > 0:
            self._idle_timer = self.loop.call_later(self.policy.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        timeout = self.policy.idle_timeout
        idle = self.loop.time() - self.last_activity
        if self.flow.busy() or self.dispatcher.pending or idle < timeout:
            self._idle_timer = self.loop.call_later(max(timeout - idle, 0.05), self._idle_check)
            return
        self._idle_timer = None
        self.reason = f"idle for {timeout:g} s (--idle-timeout)"
        self.log.info("%s, closing", self.reason)
        self.closing = True
        self.close_when_idle()

    def denied(self, export: str) -> None:
        """The peer asked for an export its allow rules do not admit."""
        audit.warning(
            "access denied: peer=%s export=%s subject=%s",
            self.peer_text,
            quote(export),
            quote(self.peer.subject_text() or "-"),
        )


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
