"""The bounds of one NBD connection's flow: requests in flight and the memory their replies
may hold. FlowControl stops reading from the client when they are reached.

Memory per connection is bounded: the core buffers at most one option (1 MiB) or one read
burst; at most ``max_in_flight`` requests are parsed and not yet answered; requests start
only while the replies they may produce plus the unsent output stay within ``max_buffered``
(one request always may start when nothing else is in flight); reading stops whenever any of
these is reached, and while the client does not take what is written (pause_writing)."""

import asyncio
from typing import TYPE_CHECKING

from ..proto.constants import Command
from ..proto.server import Request

if TYPE_CHECKING:
    from .server import NBDConnection

# Requests served at once per connection; past this we stop reading from the client.
MAX_IN_FLIGHT = 64
# Reply bytes a connection may hold (reads in flight plus output not yet sent).
MAX_BUFFERED = 64 * 1024 * 1024
# What a block status reply may take, for that budget (2 MiB at most: 131072 extents).
BLOCK_STATUS_COST = 256 * 1024


def request_cost(request: Request) -> int:
    """Bytes of reply (or of a WRITE's payload) a request may hold in memory until it is
    answered."""
    if request.command == Command.READ or request.command == Command.WRITE:
        return request.length
    if request.command == Command.BLOCK_STATUS:
        return BLOCK_STATUS_COST
    return 0


def reading_full(busy: int, limit: int, reading_paused: bool) -> bool:
    """Too many requests in flight to read more. Reading stops at ``limit`` and starts again
    at half of it, so that a client that keeps the limit filled (nbdcopy: 64 requests a
    connection) does not flip reading off and on with every reply."""
    return busy >= (limit if not reading_paused else limit // 2 + 1)


class FlowControl:
    """What one connection has in flight, and whether it may read and start more."""

    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        self.max_in_flight = connection.policy.max_in_flight
        self._max_buffered = connection.policy.max_buffered
        # Requests served as tasks (and the TLS upgrade), and requests relayed upstream.
        self.tasks: set[asyncio.Task[None]] = set()
        self.relayed = 0
        # Reply bytes the requests in flight may hold (request_cost).
        self.in_flight_bytes = 0
        self.reading_paused: bool = False
        self.writing_paused = False
        self.tls_handshake = False

    def busy(self) -> int:
        return len(self.tasks) + self.relayed

    def room(self) -> int:
        """Requests that may still be parsed."""
        return self.max_in_flight - self.busy() - len(self._connection.dispatcher.pending)

    def may_start(self, request: Request) -> bool:
        return not self.writing_paused and self.within_budget(request_cost(request))

    def within_budget(self, cost: int, count: int = 1) -> bool:
        """Whether ``count`` requests whose replies may hold ``cost`` bytes fit the memory
        budget beside what is in flight and unsent; one request may always start when
        nothing else runs."""
        if count == 1 and not self.busy():
            return True
        unsent = self._connection.output.unsent()
        return self.in_flight_bytes + cost + unsent <= self._max_buffered

    def full(self) -> bool:
        return reading_full(self.busy(), self.max_in_flight, self.reading_paused)

    def update_reading(self) -> None:
        connection = self._connection
        transport = connection.output.transport
        assert transport is not None
        if self.tls_handshake:
            return  # the raw transport belongs to the TLS handshake now
        want_pause = (
            self.writing_paused
            or bool(connection.dispatcher.pending)
            or connection.core.backlog
            or self.full()
        )
        # A connection whose writes are spliced reads its socket itself (write_intake).
        reader = connection.reads.intake or transport
        if want_pause and not self.reading_paused:
            reader.pause_reading()
            self.reading_paused = True
        elif not want_pause and self.reading_paused and not reader.is_closing():
            reader.resume_reading()
            self.reading_paused = False

    def pause_for_tls(self, transport: asyncio.Transport) -> None:
        """Nothing may reach the core or the TLS layer before start_tls owns the socket: the
        client's ClientHello must not be taken for NBD bytes."""
        transport.pause_reading()
        self.reading_paused = True
        self.tls_handshake = True

    def tls_established(self) -> None:
        self.tls_handshake = False
        self.reading_paused = False
