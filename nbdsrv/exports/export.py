"""The export interface every backend fills: size, contexts, reads, extents.

Reads return *segments* ``(offset, length, data)`` where ``data`` is ``None`` for a range
known to read as zeroes (sent as NBD_REPLY_TYPE_OFFSET_HOLE to structured clients).
Extents are ``(length, flags)`` starting at the asked offset; they may stop early or run
past the asked range — the protocol core clips, merges and caps them.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..proto.constants import MAX_BLOCK_STATUS_EXTENTS
from ..proto.extents import Extent

Segment = tuple[int, int, bytes | bytearray | memoryview | None]


class ExportGone(Exception):
    """The export was removed while a client still used it (answered with ESHUTDOWN)."""


class Export(ABC):
    """A read-only NBD export."""

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

    def close(self) -> None:
        """Release resources; later requests get ESHUTDOWN."""
        self.closed = True

    def describe(self) -> dict[str, object]:
        """What ``nbdsrv status`` shows of this export."""
        return {"name": self.name, "size": self.size, "contexts": list(self.contexts)}
