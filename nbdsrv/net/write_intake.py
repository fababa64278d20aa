"""WRITEs of a plain client connection to a relayed writable export (``restore/ID``), moved
from the client's socket to QEMU's without passing through nbdsrv's memory.

Once the connection's upstream link is open, the intake reads the client's socket itself
(on a duplicate of its descriptor; the event loop's transport stops reading): one request
header at a time. A valid WRITE the export takes is relayed at once when flow control lets
it start — its header goes upstream, then its payload is spliced from the client's socket
into a pipe and from the pipe into QEMU's socket behind it, nothing else written upstream in
between. Everything else (other commands, a WRITE that is refused, one that must wait while
other requests wait, bytes the protocol core buffered before) goes to the protocol core as
the transport would have handed it over, and takes the general path; a refused WRITE's
payload is read and thrown away there as before.

Errors: a client that disconnects in the middle of a payload gets its connection closed and
the upstream link aborted, so QEMU drops the WRITE it has only part of; if the upstream link
breaks in the middle of a payload, the WRITE's reply is an error and the rest of its payload
is read and thrown away (the next requests fail as on any broken link).
"""

import os
import socket
from typing import TYPE_CHECKING

from ..proto.server import Request
from .direct_writer import SPLICE_FLAGS
from .relay import ReadRelay, open_pipe

if TYPE_CHECKING:
    from .server import NBDConnection

# Socket reads and splices per wake-up, so that one busy client does not starve the others.
STEPS_PER_WAKEUP = 64
# Most bytes handed to the protocol core at once (a WRITE it buffers whole: up to 32 MiB).
FEED_LIMIT = 1024 * 1024
# A payload thrown away is read in pieces of this size.
DISCARD_BUFFER = 256 * 1024


class WriteIntake:
    """The input side of one plain client connection with a relay that takes writes."""

    def __init__(self, connection: "NBDConnection", relay: ReadRelay) -> None:
        self._connection = connection
        self._relay = relay
        self._upstream = relay.upstream
        self._core = connection.core
        self._flow = connection.flow
        self._loop = connection.loop
        transport = connection.output.raw_transport
        assert transport is not None
        self._sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._pipe, self._pipe_size = open_pipe()
        self._header = bytearray(self._core.request_header_size)
        self._view = memoryview(self._header)
        self._have = 0  # bytes of the next request header received
        self._payload = 0  # bytes of the current WRITE's payload still to move
        self._discarding = False  # that payload is thrown away
        self._scratch: bytearray | None = None
        self._paused = bool(connection.flow.reading_paused)  # flow control's say
        self._full = False  # the pipe is full: waiting for the upstream link to take it
        self._ended = False  # the client's end of the socket is closed
        self._reading = False
        self._scheduled = False
        self.closed = False
        transport.pause_reading()

    @classmethod
    def start(cls, connection: "NBDConnection", relay: ReadRelay) -> "WriteIntake | None":
        """The intake of ``connection``, reading from now on; None when its writes take
        the general path (TLS, no direct writer, an upstream link that cannot be written
        directly)."""
        if connection.core.tls or connection.output.writer is None:
            return None
        if not connection.core.writable or connection.output.raw_transport is None:
            return None
        intake: WriteIntake | None = None
        if not relay.upstream.write_directly(lambda: intake._room() if intake else None):
            return None
        intake = cls(connection, relay)
        intake._update()
        return intake

    # -- what FlowControl calls on a transport ----------------------------------------------

    def pause_reading(self) -> None:
        self._paused = True
        self._update()

    def resume_reading(self) -> None:
        self._paused = False
        self._update()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._update()
        self._sock.close()
        for fd in self._pipe:
            os.close(fd)

    # -- reading ----------------------------------------------------------------------------

    def _update(self) -> None:
        """Watch the socket while there is something to read: a payload begun (flow control
        does not stop that), or requests when flow control lets them in."""
        want = (
            not self.closed
            and not self._ended
            and not self._full
            and (self._payload > 0 or not self._paused)
        )
        if want and not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)
        elif not want and self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if want and self._have == len(self._header) and not self._scheduled:
            # A whole header waits (for room to start): the socket may have nothing new.
            self._scheduled = True
            self._loop.call_soon(self._readable)

    def _room(self) -> None:
        """The upstream link took what the pipe held (or is gone)."""
        if self._full:
            self._full = False
            self._update()

    def _readable(self) -> None:
        self._scheduled = False
        try:
            for _ in range(STEPS_PER_WAKEUP):
                if self.closed or not self._step():
                    return
        except BlockingIOError:
            pass
        except OSError as e:
            self._cut(f"reading from the client failed: {e}")

    def _step(self) -> bool:
        """One read or splice; False when there is nothing more to do now."""
        if self._payload:
            return self._discard() if self._discarding else self._move()
        if self._paused or self._ended:
            return False
        wanted = self._core.wanted()
        if wanted:
            # The protocol core has part of a message (bytes from before the intake, or a
            # request it parses itself): it gets exactly the rest.
            data = self._sock.recv(min(wanted, FEED_LIMIT))
            if not data:
                return self._eof()
            self._connection.data_received(data)
            return True
        header = self._header
        if self._have < len(header):
            n = self._sock.recv_into(self._view[self._have :])
            if not n:
                return self._eof()
            self._have += n
            if self._have < len(header):
                return False
        return self._begin()

    def _begin(self) -> bool:
        """A whole request header is here: relay its WRITE, or hand it to the core."""
        request = self._core.write_request(self._header)
        if request is None or not self._may_relay():
            self._have = 0
            self._connection.data_received(bytes(self._header))
            return True
        flow = self._flow
        if not flow.within_budget(request.length) or flow.full():
            # Wait for replies; FlowControl's resume_reading brings it back.
            self._paused = flow.reading_paused = True
            self._update()
            return False
        self._have = 0
        connection = self._connection
        connection.requests += 1
        connection.last_activity = self._loop.time()
        flow.in_flight_bytes += request.length
        flow.relayed += 1
        self._start(request)
        return True

    def _may_relay(self) -> bool:
        """Whether a WRITE may go upstream now, spliced: nothing waits before it, the link
        is up and the export has not failed (else the general path answers)."""
        connection = self._connection
        return (
            connection.dispatcher.bypass_allowed()
            and connection.reads.attaching is None
            and not self._upstream.closed
            and self._relay.refusal() is None
        )

    def _start(self, request: Request) -> None:
        self._payload = request.length
        self._discarding = not self._relay.begin_write(request)

    def _move(self) -> bool:
        upstream = self._upstream
        if upstream.closed:
            # The link broke in the middle of the payload: its reply is an error already.
            self._discarding = True
            return True
        room = self._pipe_size - upstream.pipe_bytes
        try:
            if room <= 0:
                raise BlockingIOError()
            n = os.splice(self._fd, self._pipe[1], min(self._payload, room), flags=SPLICE_FLAGS)
        except BlockingIOError:
            if upstream.pipe_bytes:
                # The pipe is full (it counts buffers, not only bytes): wait until the
                # upstream link has taken some (_room).
                self._full = True
                self._update()
                return False
            raise  # nothing from the client yet
        if not n:
            return self._cut("client closed the connection in the middle of a WRITE")
        self._payload -= n
        upstream.write_payload(self._pipe[0], n)
        if not self._payload:
            upstream.end_write()
            self._update()
        return True

    def _discard(self) -> bool:
        if self._scratch is None:
            self._scratch = bytearray(DISCARD_BUFFER)
        n = self._sock.recv_into(self._scratch, min(self._payload, DISCARD_BUFFER))
        if not n:
            return self._cut("client closed the connection in the middle of a WRITE")
        self._payload -= n
        if not self._payload:
            self._discarding = False
            self._update()
        return True

    def _eof(self) -> bool:
        """The client closed its end between requests (or inside one the core parses):
        what was received is answered, then the connection closes."""
        self._ended = True
        self._update()
        self._connection.eof_received()
        return False

    def _cut(self, reason: str) -> bool:
        """The connection cannot go on (the client left in the middle of a WRITE, or its
        socket failed): QEMU's link is aborted, so a WRITE it has only part of is dropped."""
        connection = self._connection
        connection.reason = connection.reason or reason
        connection.log.warning("%s: closing the connection", reason)
        self._payload = 0
        self._ended = True
        self._update()
        if not self._upstream.closed:
            self._upstream.abort()
        connection.force_close()
        return False
