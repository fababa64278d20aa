"""The READ paths of one NBD connection. Every READ is answered by ``reply`` from the segments
its export returns, at once (``answer_at_once``: pages in the page cache, sent with sendfile;
no task) or awaited (``answer``: preadv, a worker thread on a miss), unless the connection
relays its READs to an upstream connection of its own (session exports): then ``relayed``
hands each to the relay, and ``forward_at_once`` forwards plain READs straight from the
received bytes."""

import asyncio
from typing import TYPE_CHECKING

from ..exports.export import Export, ExportGone, Segment
from ..proto.constants import Command, Errno
from ..proto.errors import NBDError
from ..proto.server import Request
from .dispatcher import COMMAND_NAMES
from .flow_control import request_cost
from .relay import ReadRelay
from .write_intake import WriteIntake

if TYPE_CHECKING:
    from .server import NBDConnection

# Requests of a writable export that go over the connection's upstream link like READs.
RELAYED_WRITES = frozenset(
    (Command.WRITE, Command.WRITE_ZEROES, Command.TRIM, Command.FLUSH, Command.CACHE)
)


class ReadPaths:
    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        # READs relayed to an upstream connection of this connection's own (session exports):
        # no task each; counted in FlowControl.relayed until their reply is written.
        self.relay: ReadRelay | None = None
        self.attaching: asyncio.Task[None] | None = None
        # Opened at the first READ (or write): a client that only maps (nbdinfo, qemu-img
        # map) costs neither nbdsrv nor QEMU an upstream handshake.
        self.upstream_wanted = False
        # Reads the client's socket itself once the relay is there, to splice WRITE
        # payloads upstream (plain connections to a writable export; write_intake).
        self.intake: WriteIntake | None = None

    def reply(self, export: Export, request: Request, segments: list[Segment]) -> None:
        """Answer a READ with what the export returned for it."""
        connection = self._connection
        connection.output.send_read(request, segments)
        connection.bytes_served += request.length
        connection.dispatcher.answered(export, request, request.length)

    def answer_at_once(self, request: Request) -> bool:
        """Answer a READ at once, with no task, if the export has the data at hand (a file's
        pages in the page cache, sent with sendfile); only a connection that writes to its
        socket itself can send those."""
        connection = self._connection
        export = connection.dispatcher.serving()
        if export is None or connection.output.writer is None:
            return False  # the general path answers
        try:
            segments = export.read_cached(request.offset, request.length)
        except OSError as e:
            connection.dispatcher.failed(request, export, e)
            return True
        if segments is None:
            return False
        self.reply(export, request, segments)
        return True

    async def answer(self, export: Export, request: Request) -> None:
        segments = await export.read(request.offset, request.length)
        if export.closed:
            raise ExportGone()
        self.reply(export, request, segments)

    # -- relayed ----------------------------------------------------------------------------

    def attach_for(self, request: Request) -> None:
        """Open the upstream connection when the first request that goes over it comes."""
        connection = self._connection
        if request.command == Command.READ or (
            connection.core.writable and request.command in RELAYED_WRITES
        ):
            self.upstream_wanted = False
            assert connection.export is not None
            self.attaching = connection.loop.create_task(self._attach(connection.export))

    async def _attach(self, export: Export) -> None:
        """Open this connection's own upstream connection; requests wait until then."""
        connection = self._connection
        try:
            upstream = await export.open_upstream()
        except (OSError, NBDError) as e:
            # Reads then go through export.read(), which answers for itself.
            connection.log.warning("no upstream connection of its own: %s", e)
            return
        finally:
            self.attaching = None
            connection.loop.call_soon(connection.dispatcher.pump)
        if connection.lost:
            upstream.abort()
            return
        self.relay = ReadRelay(
            export,
            upstream,
            connection.core,
            connection.output.output,
            self.relayed_done,
            writer=connection.output.writer,
            fatal=self._reply_cut,
        )
        if export.writable and connection.policy.zero_copy:
            self.intake = WriteIntake.start(connection, self.relay)

    def _reply_cut(self, reason: str) -> None:
        connection = self._connection
        connection.reason = reason
        connection.log.warning("%s: closing the connection", reason)
        connection.force_close()

    def relayed(self, relay: ReadRelay, request: Request) -> bool:
        """Hand a request to the relay if it goes upstream."""
        if request.command == Command.READ:
            self._connection.flow.relayed += 1
            relay.read(request)
            return True
        if request.command in RELAYED_WRITES and relay.export.writable and relay.takes(request):
            self._connection.flow.relayed += 1
            relay.command(request)
            return True
        return False

    def forward_at_once(self, relay: ReadRelay, data: bytes) -> bool:
        """Plain READs relayed straight from the received bytes when they hold only such
        requests, nothing else waits and the limits leave room for all of them: no event,
        no pump; the dispatcher would relay the same requests."""
        connection = self._connection
        if not connection.dispatcher.bypass_allowed():
            return False
        flow = connection.flow
        requests = connection.core.read_requests(data)
        if requests is None:
            return False
        count = len(requests)
        busy = flow.busy() + count
        if busy > flow.max_in_flight:
            return False
        cost = sum(request.length for request in requests)
        if not flow.within_budget(cost, count):
            return False
        if not relay.forward(data, requests):
            return False
        connection.requests += count
        flow.relayed += count
        flow.in_flight_bytes += cost
        if busy >= flow.max_in_flight:
            flow.update_reading()
        return True

    def relayed_done(self, request: Request, served: int, error: tuple[Errno, str] | None) -> None:
        connection = self._connection
        flow, dispatcher = connection.flow, connection.dispatcher
        flow.relayed -= 1
        flow.in_flight_bytes -= request_cost(request)
        connection.bytes_served += served
        if error is None and connection.export is not None:
            dispatcher.answered(connection.export, request, served)
        if error is not None and error[0] != Errno.ESHUTDOWN and not dispatcher.refusal_counted():
            connection.log.warning(
                "%s at %d+%d failed: %s",
                COMMAND_NAMES[request.command],
                request.offset,
                request.length,
                error[1],
            )
        connection.last_activity = connection.loop.time()
        if (
            dispatcher.pending
            or connection.core.backlog
            or (flow.reading_paused and not flow.full())
        ):
            dispatcher.pump()
        if connection.closing:
            connection.close_when_idle()

    def close(self) -> None:
        if self.attaching is not None:
            self.attaching.cancel()
        if self.relay is not None:
            self.relay.close()
        if self.intake is not None:
            self.intake.close()
