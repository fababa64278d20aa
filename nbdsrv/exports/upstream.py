"""A session export: data and allocation read from QEMU's fleecing export through nbdsrv's own
NBD client; dirty-bitmap contexts answered from memory.

Each client connection gets an upstream connection of its own for its READs, which the server
relays (nbdsrv.net.relay): QEMU allows 16 requests in flight per connection, so clients with
several connections (nbdcopy, multi-conn) get the same parallelism as on QEMU's own export.
Block status and read() share a small pool.
"""

import asyncio
import contextlib
import errno
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence

from ..net.address import Address
from ..net.client import NBDClient
from ..proto.constants import BASE_ALLOCATION, MAX_BLOCK_STATUS_EXTENTS
from ..proto.errors import NBDError
from ..proto.extents import Extent, PackedExtents, StatusSource
from ..together import all_of
from .coverage import ReadCoverage
from .dirty_bitmap import DirtyBitmap
from .dirty_runs import DirtyRuns
from .export import Export, Segment
from .upstream_links import UpstreamLinks

log = logging.getLogger(__name__)

# Shared connections to QEMU's export per session disk (block status, read()).
UPSTREAM_CONNECTIONS = 2
# Largest block-status request sent upstream (compact headers: 32-bit lengths).
MAX_UPSTREAM_STATUS = (1 << 32) - (1 << 20)


async def fetch_bitmap(
    address: Address, export: str, context: str, size: int, granularity: int
) -> DirtyBitmap:
    """Read a whole bitmap context from an NBD export into memory.

    The disk is cut into windows of the largest request, all asked for at once (one round
    trip per window in a row made a 1 TiB disk 256 round trips per bitmap); a window whose
    reply stops early is asked again from where it stopped."""
    client = await NBDClient.connect(address, export, contexts=[context])
    try:
        if context not in client.contexts.values():
            raise NBDError(f"QEMU's export {export} does not offer {context}")
        bitmap = DirtyBitmap(size, granularity)

        async def window(offset: int, end: int) -> None:
            while offset < end:
                status = await client.block_status(offset, end - offset)
                extents = status.get(context)
                if not extents:
                    raise NBDError(f"no extents for {context} at {offset}")
                for length, flags in extents:
                    length = min(length, end - offset)
                    if flags & 1:
                        bitmap.mark(offset, length)
                    offset += length
                    if offset >= end:
                        break

        step = MAX_UPSTREAM_STATUS
        await asyncio.gather(*(window(o, min(o + step, size)) for o in range(0, size, step)))
        return bitmap
    finally:
        await client.close()


class UpstreamExport(Export):
    """``VM/DISK`` of a backup session."""

    def __init__(
        self,
        name: str,
        size: int,
        address: Address,
        upstream_export: str,
        bitmaps: Mapping[str, DirtyBitmap],
        description: str = "",
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name, size, description)
        # Told about every failed request to QEMU: QEMU fails snapshot reads once the point
        # in time is broken, so one failure means the whole session is.
        self.on_failure = on_failure
        self.address = address
        self.upstream_export = upstream_export
        self.bitmaps: dict[str, DirtyRuns] = {}
        self.freeze_bitmaps(bitmaps)
        self.failure: str | None = None
        # Requests refused with EIO since the failure (the session logs the count).
        self.refusals = 0
        self.coverage = ReadCoverage()
        self._clients: list[NBDClient] = []
        self.links = UpstreamLinks(address, upstream_export)
        self._next = itertools.cycle(range(UPSTREAM_CONNECTIONS))

    relays_reads = True

    def freeze_bitmaps(self, bitmaps: Mapping[str, DirtyBitmap]) -> None:
        """Add the dirty-bitmap contexts (before the export is in the catalog), frozen for
        the session: runs found and descriptors packed once, bitarrays dropped."""
        self.bitmaps.update((context, DirtyRuns(bitmap)) for context, bitmap in bitmaps.items())

    @property
    def contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION, *self.bitmaps)

    async def open_upstream(self) -> NBDClient:
        self._check()
        return await self.links.open(lambda: self.closed)

    def broken(self) -> str | None:
        return self.failure

    def read_served(self, offset: int, length: int) -> None:
        self.coverage.add(offset, length)

    async def open(self) -> None:
        """The shared connections to QEMU, made at the same time."""

        async def connect() -> None:
            client = await NBDClient.connect(
                self.address, self.upstream_export, contexts=[BASE_ALLOCATION]
            )
            self._clients.append(client)  # closed by aclose(), even when another failed

        await all_of(*(connect() for _ in range(UPSTREAM_CONNECTIONS)))

    def fail(self, reason: str) -> None:
        """From now on every request gets EIO: the point in time can no longer be trusted."""
        if self.failure is None:
            self.failure = reason
            log.error("export %s failed: %s", self.name, reason)

    def _check(self) -> None:
        if self.failure is not None:
            raise OSError(errno.EIO, f"backup session failed: {self.failure}")

    def read_failed(self, detail: str) -> None:
        """A relayed READ failed in QEMU: the first one fails the session (QEMU fails every
        read of a broken snapshot), no need to wait for the probe."""
        if self.failure is None and not self.closed:
            self._upstream_failed(detail)

    def count_refusal(self) -> bool:
        """Counted, not logged one by one: the session logs the count once (it logged the
        cause when it failed)."""
        if self.failure is None:
            return False
        self.refusals += 1
        return True

    def _upstream_failed(self, detail: str) -> None:
        if self.on_failure is not None:
            self.on_failure(detail)
        self.fail(detail)

    async def probe(self) -> None:
        """Read one sector from QEMU; a failure fails the export (and tells on_failure)."""
        if self.failure is not None or self.closed or not self._clients:
            return
        try:
            await self._client().read(0, min(512, self.size))
        except NBDError as e:
            self._upstream_failed(f"reading from QEMU: {e}")

    def _client(self) -> NBDClient:
        return self._clients[next(self._next)]

    async def read(self, offset: int, length: int) -> list[Segment]:
        self._check()
        try:
            data = await self._client().read(offset, length)
        except NBDError as e:
            self._upstream_failed(f"reading from QEMU: {e}")
            raise OSError(errno.EIO, f"reading from QEMU: {e}") from e
        # A failure noticed while the read was under way may mean data from after the point
        # in time: never hand it out.
        self._check()
        self.coverage.add(offset, length)
        return [(offset, length, data)]

    async def extents(
        self, context: str, offset: int, length: int, limit: int = MAX_BLOCK_STATUS_EXTENTS
    ) -> list[Extent]:
        self._check()
        runs = self.bitmaps.get(context)
        if runs is not None:
            return runs.extents(offset, length, limit)
        if context != BASE_ALLOCATION:
            raise OSError(errno.EINVAL, f"unknown context {context}")
        try:
            status = await self._client().block_status(
                offset, min(length, MAX_UPSTREAM_STATUS), req_one=limit == 1
            )
        except NBDError as e:
            self._upstream_failed(f"block status from QEMU: {e}")
            raise OSError(errno.EIO, f"block status from QEMU: {e}") from e
        self._check()
        return status.get(BASE_ALLOCATION, [])

    def packed_extents(
        self, context: str, offset: int, length: int, limit: int, *, extended: bool
    ) -> PackedExtents | None:
        runs = self.bitmaps.get(context)
        if runs is None:
            return None
        self._check()
        return runs.packed(offset, length, limit, extended=extended)

    def status_source(self, context: str, *, extended: bool) -> StatusSource | None:
        runs = self.bitmaps.get(context)
        return runs.table(extended=extended) if runs is not None else None

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "kind": "session",
            "failure": self.failure,
            "dirty_map_bytes": sum(runs.nbytes() for runs in self.bitmaps.values()),
        }

    async def aclose(self) -> None:
        """Close the export (its clients get ESHUTDOWN) and the connections to QEMU."""
        self.close()
        self.links.abort_all()
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
