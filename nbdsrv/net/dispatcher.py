"""The transmission-phase request dispatcher of one NBD connection: received bytes through
the protocol core to events, requests started when flow control lets them, each on its path
(read_paths, status_paths, the export's write methods), and every request's failure answered
the same way."""

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from ..exports.export import Export, ExportGone
from ..proto.constants import Command, Errno
from ..proto.errors import ProtocolError, nbd_errno
from ..proto.server import Disconnect, Negotiated, Request, StartTLS
from .flow_control import request_cost

if TYPE_CHECKING:
    from .server import NBDConnection

# Enum's .name is a property lookup: too slow for every request.
COMMAND_NAMES = {command: command.name for command in Command}


class RequestDispatcher:
    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        # Parsed, waiting for flow control to let them start.
        self.pending: deque[Request] = deque()
        self._continue_scheduled = False

    def received(self, data: bytes) -> bool:
        """Handle received bytes; True when they were block status answered at once."""
        connection = self._connection
        reads = connection.reads
        relay = reads.relay
        if relay is not None and relay.forwards and reads.forward_at_once(relay, data):
            return False
        status = connection.status
        if status.sources is not None and status.answer_received(data):
            return True
        self.receive(data)
        return False

    def bypass_allowed(self) -> bool:
        """Whether received bytes may skip the general path (the fast paths of read_paths
        and status_paths): nothing waits before them, the client takes our output, and
        neither the connection nor the server is closing."""
        connection = self._connection
        return not (
            self.pending
            or connection.flow.writing_paused
            or connection.closing
            or connection.server.stopping
        )

    def receive(self, data: bytes) -> None:
        """The general path: events from the protocol core, requests queued and started."""
        connection = self._connection
        try:
            events = connection.core.receive(data, max(connection.flow.room(), 0))
        except ProtocolError as e:
            connection.reason = f"protocol error: {e}"
            connection.log.warning("protocol error, closing: %s", e)
            connection.output.flush()
            connection.output.close()
            return
        connection.output.flush()
        reads = connection.reads
        for event in events:
            if isinstance(event, Request):
                connection.requests += 1
                self.pending.append(event)
                if reads.upstream_wanted:
                    reads.attach_for(event)
            elif isinstance(event, Negotiated):
                connection.handshake.negotiated(event)
            elif isinstance(event, StartTLS):
                connection.handshake.start_tls()
            elif isinstance(event, Disconnect):
                connection.log.debug("%s", event.reason)
                connection.reason = event.reason
                connection.closing = True
        self.pump()
        connection.close_when_idle()

    def pump(self) -> None:
        """Start what may start, parse what is buffered when there is room, and read only
        when every bound leaves room."""
        connection = self._connection
        if connection.lost:
            return
        flow = connection.flow
        if self.pending and connection.reads.attaching is None:
            relay = connection.reads.relay
            if relay is not None:
                relay.cork()  # the requests started now go upstream in one write
            while self.pending and flow.may_start(self.pending[0]):
                self._start(self.pending.popleft())
            if relay is not None:
                relay.uncork()
        if connection.core.backlog and flow.room() > 0 and not self._continue_scheduled:
            self._continue_scheduled = True
            connection.loop.call_soon(self._continue)
        transport = connection.output.transport
        if transport is not None and not transport.is_closing():
            flow.update_reading()

    def _continue(self) -> None:
        self._continue_scheduled = False
        if not self._connection.lost and self._connection.core.backlog:
            self.receive(b"")

    def _start(self, request: Request) -> None:
        connection = self._connection
        flow = connection.flow
        cost = request_cost(request)
        flow.in_flight_bytes += cost
        reads = connection.reads
        if reads.relay is not None and reads.relayed(reads.relay, request):
            return  # its cost is given back when it is answered (ReadPaths.relayed_done)
        if request.command == Command.READ:
            if reads.answer_at_once(request):
                flow.in_flight_bytes -= cost
                return
        elif request.command == Command.BLOCK_STATUS:
            reply = connection.status.reply_at_once(request)
            if reply is not None:
                flow.in_flight_bytes -= cost
                connection.output.send(reply)
                return
        task = connection.loop.create_task(self._serve(request, cost))
        flow.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        connection = self._connection
        connection.flow.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            connection.reason = f"internal error: {task.exception()}"
            connection.log.error("request failed unexpectedly", exc_info=task.exception())
            connection.output.close()
            return
        connection.last_activity = connection.loop.time()
        self.pump()
        connection.close_when_idle()

    def serving(self) -> Export | None:
        """The export while requests may be served from it; None: they get ESHUTDOWN."""
        export = self._connection.export
        if export is None or export.closed or self._connection.server.stopping:
            return None
        return export

    async def _serve(self, request: Request, cost: int) -> None:
        try:
            await self._answer(request)
        finally:
            self._connection.flow.in_flight_bytes -= cost

    async def _answer(self, request: Request) -> None:
        connection = self._connection
        export = connection.export
        try:
            export = self.serving()
            if export is None:
                raise ExportGone()
            if request.command == Command.READ:
                await connection.reads.answer(export, request)
            elif request.command == Command.BLOCK_STATUS:
                await connection.status.answer(export, request)
            else:
                await _write_request(export, request)
                if export.closed:
                    raise ExportGone()
                connection.output.send(connection.core.ok_reply(request))
                self.answered(export, request, 0)
        except ExportGone:
            self.gone(request)
        except OSError as e:
            self.failed(request, export, e)

    def gone(self, request: Request) -> None:
        self._connection.output.send(
            self._connection.core.error_reply(request, Errno.ESHUTDOWN, "export is gone")
        )

    def failed(self, request: Request, export: Export | None, error: OSError) -> None:
        """A request the export failed: its errno to the client, one warning in the log."""
        if export is not None and export.closed:
            # Removed while this request waited: its failure is the removal's.
            self.gone(request)
            return
        if not self.refusal_counted():
            self._connection.log.warning(
                "%s at %d+%d failed: %s",
                COMMAND_NAMES[request.command], request.offset, request.length, error,
            )  # fmt: skip
        self._connection.output.send(
            self._connection.core.error_reply(request, nbd_errno(error), str(error))
        )

    def refusal_counted(self) -> bool:
        """A failed export counts its refusals and logs them once: no line per request."""
        export = self._connection.export
        return export is not None and export.count_refusal()

    def answered(self, export: Export, request: Request, read_bytes: int) -> None:
        on_request = self._connection.server.on_request
        if on_request is not None:
            on_request(export.name, COMMAND_NAMES[request.command], read_bytes)


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
