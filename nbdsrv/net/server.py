"""The NBD server on asyncio: one protocol object per client around the sans-I/O core."""

import asyncio
import contextlib
import errno
import logging
import os
import socket
from typing import Any

from ..catalog import ExportCatalog
from ..errors import nbd_errno
from ..export import Export, ExportGone
from ..proto.constants import Command, Errno
from ..proto.errors import ProtocolError
from ..proto.server import Disconnect, Negotiated, Request, ServerConnection
from .address import Address
from .socket_path import clear_stale_socket

log = logging.getLogger(__name__)

# Requests served at once per connection; past this we stop reading from the client.
MAX_IN_FLIGHT = 64
UNIX_SEND_BUFFER = 4 * 1024 * 1024


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        return f"[{self.extra['peer']}] {msg}", kwargs


class NBDConnection(asyncio.Protocol):
    """One client, from greeting to close."""

    def __init__(self, server: "NBDServer") -> None:
        self._server = server
        self._core = ServerConnection(server.catalog)
        self._transport: asyncio.Transport | None = None
        # Protocol objects are made by the running loop; keep it (each lookup costs a getpid).
        self._loop = asyncio.get_running_loop()
        self._export: Export | None = None
        self._contexts: list[tuple[int, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self.log: logging.LoggerAdapter = ConnectionLog(log, {"peer": "?"})  # type: ignore[type-arg]
        self.bytes_served = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername") or "unix"
        self.log = ConnectionLog(log, {"peer": peer})
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None and sock.family == socket.AF_UNIX:
            # The default unix send buffer (~208 KiB) holds less than one 256 KiB read
            # reply: the client then wakes up for every fragment. TCP tunes itself.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        self._server.connections.add(self)
        self.log.debug("connected")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for task in self._tasks:
            task.cancel()
        self.log.debug("disconnected (%s), %d bytes served", exc or "closed", self.bytes_served)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._core.receive(data)
        except ProtocolError as e:
            self.log.warning("protocol error, closing: %s", e)
            self._flush()
            self._abort()
            return
        self._flush()
        for event in events:
            if isinstance(event, Request):
                self._start(event)
            elif isinstance(event, Negotiated):
                self._negotiated(event)
            elif isinstance(event, Disconnect):
                self.log.debug("%s", event.reason)
                self._closing = True
                self._close_when_idle()

    def eof_received(self) -> bool | None:
        self._closing = True
        self._close_when_idle()
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def shut_down(self) -> None:
        """Server stopping: requests in flight finish, later ones get ESHUTDOWN, then close."""
        self._closing = True
        if self._export is None:
            self._abort()
        self._close_when_idle()

    def force_close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- plumbing ---------------------------------------------------------------------------

    def _flush(self) -> None:
        out = self._core.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _close_when_idle(self) -> None:
        if self._closing and not self._tasks and self._transport is not None:
            self._transport.close()

    def _update_reading(self) -> None:
        assert self._transport is not None
        want_pause = self._writing_paused or len(self._tasks) >= MAX_IN_FLIGHT
        if want_pause and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused and not self._transport.is_closing():
            self._transport.resume_reading()
            self._reading_paused = False

    def _negotiated(self, event: Negotiated) -> None:
        export = self._server.catalog.find_export(event.export.name)
        self._export = export
        self._contexts = [(c.id, c.name) for c in event.contexts]
        self.log = ConnectionLog(
            log,
            {"peer": f"{self.log.extra['peer'] if self.log.extra else '?'} {event.export.name}"},
        )
        self.log.debug(
            "transmission: structured=%s extended=%s contexts=%s",
            event.structured,
            event.extended,
            [name for _, name in self._contexts],
        )

    def _start(self, request: Request) -> None:
        task = self._loop.create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        self._update_reading()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("request failed unexpectedly", exc_info=task.exception())
            self._abort()
            return
        if self._transport is not None and not self._transport.is_closing():
            self._update_reading()
        self._close_when_idle()

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def _serve(self, request: Request) -> None:
        core, export = self._core, self._export
        try:
            if export is None or export.closed or self._server.stopping:
                raise ExportGone()
            if request.command == Command.READ:
                segments = await export.read(request.offset, request.length)
                if export.closed:
                    raise ExportGone()
                buffers = core.read_reply(request, segments)
                if self._transport is not None and not self._transport.is_closing():
                    self._transport.writelines(buffers)
                self.bytes_served += request.length
            elif request.command == Command.BLOCK_STATUS:
                per_context = [
                    (cid, await export.extents(name, request.offset, request.length))
                    for cid, name in self._contexts
                ]
                if export.closed:
                    raise ExportGone()
                if not all(extents for _, extents in per_context):
                    raise OSError(errno.EIO, "the export reported no extent")
                self._send(core.block_status_reply(request, per_context))
            else:  # CACHE: a hint we have no use for
                self._send(core.ok_reply(request))
        except ExportGone:
            self._send(core.error_reply(request, Errno.ESHUTDOWN, "export is gone"))
        except OSError as e:
            if export is not None and export.closed:
                # Removed while this request waited: its failure is the removal's.
                self._send(core.error_reply(request, Errno.ESHUTDOWN, "export is gone"))
                return
            self.log.warning(
                "%s at %d+%d failed: %s", request.command.name, request.offset, request.length, e
            )
            self._send(core.error_reply(request, nbd_errno(e), str(e)))


class NBDServer:
    """Listens on every address and serves the catalog's exports."""

    def __init__(self, catalog: ExportCatalog) -> None:
        self.catalog = catalog
        self.connections: set[NBDConnection] = set()
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self.addresses: list[Address] = []

    async def listen(self, address: Address) -> None:
        loop = asyncio.get_running_loop()
        if address.kind == "unix":
            clear_stale_socket(address.path)  # never another daemon's live socket
            server = await loop.create_unix_server(lambda: NBDConnection(self), address.path)
        else:
            server = await loop.create_server(
                lambda: NBDConnection(self), address.host or None, address.port, reuse_address=True
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
