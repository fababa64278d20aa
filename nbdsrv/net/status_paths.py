"""The BLOCK_STATUS paths of one NBD connection. When every negotiated context can answer
from memory (dirty bitmaps, a file's holes: ``status_sources``), block status is answered
straight from the received bytes (``answer_received``: no Request, no task) and the client's
next request is then polled for (``poll_next``); otherwise each request is answered at once
from packed extents (``reply_at_once``) or awaited (``answer``). All send the replies the
general path would."""

import errno
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exports.export import Export, ExportGone
from ..proto.errors import nbd_errno
from ..proto.extents import Extent, PackedExtents, StatusSource
from ..proto.server import Request, extent_limit

if TYPE_CHECKING:
    from .server import NBDConnection

# Bytes read at once while polling (requests only: a few dozen a read).
POLL_READ = 64 * 1024
# Most answers that skip polling after windows that passed with nothing.
MAX_POLL_BACKOFF = 64
# Reads taken by polling before the event loop gets its turn (other connections, control
# requests): about 1 ms at most.
POLL_BURST = 16


def status_sources(
    export: Export, contexts: list[tuple[int, str]], extended: bool
) -> list[tuple[int, StatusSource]] | None:
    """What answers every negotiated context at once, if the export has that for each."""
    sources = []
    for cid, name in contexts:
        source = export.status_source(name, extended=extended)
        if source is None:
            return None
        sources.append((cid, source))
    return sources


class StatusPaths:
    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        self.contexts: list[tuple[int, str]] = []
        # Every negotiated context answered from memory: block status straight from
        # data_received.
        self.sources: list[tuple[int, StatusSource]] | None = None
        # Answers that skip polling for the next request (poll_next), and how many the next
        # empty window makes skip.
        self._poll_skip = 0
        self._poll_backoff = 1

    def negotiated(
        self, export: Export | None, contexts: list[tuple[int, str]], extended: bool
    ) -> None:
        self.contexts = contexts
        if export is not None and contexts:
            self.sources = status_sources(export, contexts, extended)

    def answer_received(self, data: bytes) -> bool:
        """Block status of in-memory contexts answered straight from the received bytes when
        they hold only such requests and nothing else waits: no Request, no pump; the
        general path would send the same replies."""
        connection = self._connection
        export = connection.export
        assert export is not None and self.sources is not None
        if (
            not connection.dispatcher.bypass_allowed()
            or export.closed
            or export.broken() is not None
        ):
            return False
        answered = connection.core.answer_status(data, self.sources)
        if answered is None:
            return False
        reply, count = answered
        connection.output.send(reply)
        connection.requests += count
        on_request = connection.server.on_request
        if on_request is not None:
            for _ in range(count):
                on_request(export.name, "BLOCK_STATUS", 0)
        return True

    def reply_at_once(self, request: Request) -> bytes | None:
        """The block status reply, if every context can answer at once (packed)."""
        connection = self._connection
        export = connection.dispatcher.serving()
        if export is None:
            return None  # the general path answers
        limit = extent_limit(request.flags)
        extended = connection.core.extended
        per_context = []
        try:
            for cid, name in self.contexts:
                packed = export.packed_extents(
                    name, request.offset, request.length, limit, extended=extended
                )
                if packed is None:
                    return None
                per_context.append((cid, packed))
        except OSError as e:
            return connection.core.error_reply(request, nbd_errno(e), str(e))
        return self._reply(export, request, per_context)

    async def answer(self, export: Export, request: Request) -> None:
        connection = self._connection
        limit = extent_limit(request.flags)
        per_context = [
            (cid, await export.extents(name, request.offset, request.length, limit))
            for cid, name in self.contexts
        ]
        if export.closed:
            raise ExportGone()
        if not all(extents for _, extents in per_context):
            raise OSError(errno.EIO, "the export reported no extent")
        connection.output.send(self._reply(export, request, per_context))

    def _reply(
        self,
        export: Export,
        request: Request,
        per_context: Sequence[tuple[int, Sequence[Extent] | PackedExtents]],
    ) -> bytes:
        """The reply of every context's extents, at once or awaited; the request answered."""
        self._connection.dispatcher.answered(export, request, 0)
        return self._connection.core.block_status_reply(request, per_context)

    def poll_next(self) -> None:
        """After block status answered at once: poll for the next request, unless windows
        that passed with nothing make this answer skip it."""
        if self._poll_skip:
            self._poll_skip -= 1
        else:
            self._poll()

    def _poll(self) -> None:
        """Wait briefly for the next request of a client that asks one thing at a time,
        reading the socket directly, instead of sleeping in the event loop: the wake-up
        costs more than the wait (the adaptive polling of QEMU's IOThreads, for the same
        reason). A window that passes with nothing makes the next answers skip polling,
        1, 2, 4 … up to 64 of them while windows keep passing empty, so a client that is
        slower than the window costs almost nothing. After POLL_BURST reads the event loop
        gets its turn (the next request then comes through it)."""
        connection = self._connection
        writer = connection.output.writer
        if writer is None:
            return
        flow, received = connection.flow, connection.dispatcher.received
        window = connection.policy.poll_window
        for _ in range(POLL_BURST):
            if writer.closed or flow.reading_paused:
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
            if not data or not received(data) or connection.lost:
                return  # an end of file stays for the transport to see
