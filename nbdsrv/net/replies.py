"""Reply writing of one NBD connection: every byte to the client goes out here, in order.

Through the event loop's transport during the handshake and under TLS; on a plain socket, once
in transmission, by nbdsrv itself (direct_writer: sendmsg, sendfile, splice). What an export's
read() returned goes back to it once its reply has left."""

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exports.export import Segment
from ..proto.server import Request
from .direct_writer import DirectWriter, Item, zero_copy_available

if TYPE_CHECKING:
    from .server import NBDConnection


class ReplyOutput:
    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        # The TLS transport once upgraded; raw_transport stays the socket's own.
        self.transport: asyncio.Transport | None = None
        self.raw_transport: asyncio.Transport | None = None
        # Writes replies once in transmission on a plain socket (see direct_writer).
        self.writer: DirectWriter | None = None
        # What read() returned for replies written but maybe not sent yet (Export.release).
        self._in_transit: list[list[Segment]] = []

    def send(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.send(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def output(self, items: Sequence[Item]) -> None:
        if self.writer is not None:
            self.writer.write(items)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(items)  # type: ignore[arg-type]  # no file ranges here

    def flush(self) -> None:
        """What the protocol core has to send (handshake replies, errors it answered)."""
        out = self._connection.core.data_to_send()
        if out:
            self.output([out])

    def send_read(self, request: Request, segments: list[Segment]) -> None:
        """A READ's reply; ``segments`` go back to the export once it has left."""
        self.output(self._connection.core.read_reply(request, segments))
        self._in_transit.append(segments)
        if not self.unsent():
            self.release_sent()

    def release_sent(self) -> None:
        """What read() returned for replies that have left goes back to the export (its
        buffers may be used again)."""
        export = self._connection.export
        if export is not None:
            for sent in self._in_transit:
                export.release(sent)
        self._in_transit.clear()

    def unsent(self) -> int:
        if self.writer is not None:
            return self.writer.buffered
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    @property
    def idle(self) -> bool:
        """Nothing of ours waits to be written (the transport flushes itself on close)."""
        return self.writer is None or self.writer.idle

    def take_writes(self) -> None:
        """Write replies directly to a plain socket from now on, when all written before
        has left the transport (it practically always has: the last option reply is small)."""
        connection = self._connection
        transport = self.transport
        if not connection.policy.zero_copy or connection.core.tls or not zero_copy_available():
            return
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        self.writer = DirectWriter(
            sock,
            on_drained=self._drained,
            on_pressure=self._pressure,
            on_failed=self._write_failed,
        )

    def close(self) -> None:
        """The connection closes once what was written has left: at once on a transport."""
        if self.writer is not None:
            self.writer.close()
        if self.transport is not None:
            self.transport.close()

    def force_close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for transport in (self.transport, self.raw_transport):
            if transport is not None:
                transport.abort()

    def lost(self) -> None:
        """The connection is gone: nothing more is sent."""
        if self.writer is not None:
            self.writer.close()
        self.release_sent()  # or never to be sent now

    def _drained(self) -> None:
        connection = self._connection
        if connection.reads.relay is not None:
            connection.reads.relay.writable()
        assert self.writer is not None
        if not self.writer.idle:
            return  # a stream is open: what others wrote waits behind it
        self.release_sent()
        if connection.closing:
            connection.loop.call_soon(connection.close_when_idle)

    def _pressure(self, high: bool) -> None:
        if high:
            self._connection.pause_writing()
        else:
            self._connection.resume_writing()

    def _write_failed(self, error: OSError) -> None:
        connection = self._connection
        connection.reason = connection.reason or f"writing to the client failed: {error}"
        connection.log.debug("%s", connection.reason)
        if self.transport is not None:
            self.transport.abort()
