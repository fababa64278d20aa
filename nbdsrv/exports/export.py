"""The export interface every backend fills: size, contexts, reads, extents.

Reads return *segments* ``(offset, length, data)`` where ``data`` is ``None`` for a range
known to read as zeroes (sent as NBD_REPLY_TYPE_OFFSET_HOLE to structured clients), or a
:class:`FileRange` of page-cached file data (``read_cached`` only).
Extents are ``(length, flags)`` starting at the asked offset; they may stop early or run
past the asked range — the protocol core clips, merges and caps them.
"""

import errno
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..errors import NbdsrvError
from ..proto.constants import MAX_BLOCK_STATUS_EXTENTS
from ..proto.extents import Extent, PackedExtents, StatusSource

if TYPE_CHECKING:
    from ..net.client import NBDClient


class FileRange(NamedTuple):
    """``length`` bytes of an open file at ``offset``, held in the page cache: a connection
    that writes to its socket itself sends them with sendfile, never copying them."""

    fd: int
    offset: int
    length: int


Segment = tuple[int, int, bytes | bytearray | memoryview | FileRange | None]


class ExportGone(NbdsrvError):
    """The export was removed while a client still used it (answered with ESHUTDOWN)."""

    code = "export-gone"


class Export(ABC):
    """An NBD export: read-only unless ``writable`` (restore exports)."""

    # Whether each client connection gets an upstream connection of its own for its READs
    # (open_upstream), relayed by the server instead of going through read(); for a
    # writable export its writes, zeroes, trims, flushes and cache hints go there too.
    relays_reads = False
    # Whether WRITE, WRITE_ZEROES and TRIM are taken (then FLUSH and CACHE are real too);
    # every other export answers them EPERM in the protocol core.
    writable = False
    # NBD_FLAG_CAN_MULTI_CONN of a writable export: a FLUSH on one connection covers the
    # writes completed on all of them.
    multi_conn = True

    def __init__(self, name: str, size: int, description: str = "") -> None:
        self.name = name
        self.size = size
        self.description = description
        self.closed = False
        self.clients = 0
        """Connections in transmission on this export now (kept by the server)."""

    @property
    @abstractmethod
    def contexts(self) -> Sequence[str]:
        """Meta-context names offered, e.g. ``["base:allocation"]``."""

    @abstractmethod
    async def read(self, offset: int, length: int) -> list[Segment]:
        """Segments covering exactly ``[offset, offset + length)``."""

    @abstractmethod
    async def extents(
        self, context: str, offset: int, length: int, limit: int = MAX_BLOCK_STATUS_EXTENTS
    ) -> list[Extent]:
        """At least one extent starting at ``offset`` for ``context``; no need for more than
        ``limit`` (1 for a REQ_ONE request: QEMU's clients ask one extent at a time)."""

    async def open_upstream(self) -> "NBDClient":
        """A new NBD connection to where the data lives, for one client connection's READs
        (only when ``relays_reads``); the server closes it with the client connection."""
        raise NotImplementedError

    def read_cached(self, offset: int, length: int) -> list[Segment] | None:
        """What :meth:`read` would return, at once (no await), when the data is at hand
        with no waiting — file data may come as FileRange, sent with sendfile; None: call
        :meth:`read`. Only asked by connections that write to their socket directly."""
        return None

    def packed_extents(
        self, context: str, offset: int, length: int, limit: int, *, extended: bool
    ) -> PackedExtents | None:
        """The extents of ``context`` in wire form, at once (no await), when the export keeps
        them so (a session's frozen dirty bitmaps); None: ask :meth:`extents`."""
        return None

    def status_source(self, context: str, *, extended: bool) -> StatusSource | None:
        """What answers ``context``'s block status at once, straight from the received
        requests, when the export keeps it in memory (a session's frozen dirty bitmaps);
        asked when a client negotiates the context. It must agree with
        :meth:`packed_extents`; the server uses it only while the export is neither closed
        nor :meth:`broken`. None: the general path."""
        return None

    def release(self, segments: Sequence[Segment]) -> None:
        """The server is done with what read() returned (the reply has left): buffers may be
        used again."""
        return None

    def read_served(self, offset: int, length: int) -> None:
        """A READ that bypassed read() (relayed) was answered with data."""
        return None

    async def write(self, offset: int, data: bytes, flags: int) -> None:
        """Write ``data`` at ``offset`` (``flags``: the request's, FUA); writable only."""
        raise OSError(errno.EPERM, "export is read-only")

    async def write_zeroes(self, offset: int, length: int, flags: int) -> None:
        """Make ``[offset, offset + length)`` read as zeroes (NO_HOLE, FAST_ZERO, FUA)."""
        raise OSError(errno.EPERM, "export is read-only")

    async def trim(self, offset: int, length: int, flags: int) -> None:
        """The range's data is no longer needed."""
        raise OSError(errno.EPERM, "export is read-only")

    async def flush(self) -> None:
        """Every write completed so far is on stable storage."""
        return None

    async def cache(self, offset: int, length: int) -> None:
        """A hint that the range will be read soon."""
        return None

    def write_served(self, command: int, offset: int, length: int) -> None:
        """A WRITE or WRITE_ZEROES (relayed or not) succeeded: for progress figures."""
        return None

    def broken(self) -> str | None:
        """Why data read from upstream can no longer be handed out, if it cannot."""
        return None

    def read_failed(self, detail: str) -> None:
        """Upstream failed a READ the server relayed (``relays_reads``)."""
        return None

    def count_refusal(self) -> bool:
        """A request is refused because the export is :meth:`broken`: True when the export
        counts it (and logs the count itself), so the server logs nothing per request."""
        return False

    def close(self) -> None:
        """Release resources; later requests get ESHUTDOWN."""
        self.closed = True

    def describe(self) -> dict[str, object]:
        """What ``nbdsrv status`` shows of this export."""
        return {"name": self.name, "size": self.size, "contexts": list(self.contexts)}
