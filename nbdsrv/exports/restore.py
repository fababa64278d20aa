"""``restore/ID``: a writable export in front of QEMU's writable export of a restore target.

Everything a client sends goes through QEMU (nbdsrv's qemu-storage-daemon, or the one that
holds a VM's disk, so the disk's recording bitmap sees the restore's writes). Each client
connection gets an upstream connection of its own, over which the server relays its READs
and its writes, zeroes, trims, flushes and cache hints (nbdsrv.net.relay); what cannot be
relayed (a zeroing longer than 32 bits from an extended-header client, a connection whose
upstream link could not be opened) goes through the methods here, over a shared connection.

NBD_FLAG_CAN_MULTI_CONN is true: every connection ends in the same QEMU block node, QEMU
answers a write only once the node has it, and a FLUSH there flushes the whole node — so a
flush on one connection covers the writes completed on all of them. nbdsrv itself caches
nothing.

A failed request is the client's to see (EIO for a block of a live restore's source that is
gone, ENOSPC, …); it never fails the export: the next request may well succeed.
"""

import asyncio
import contextlib
import errno
import logging
from collections.abc import Sequence

from ..net.address import Address
from ..net.client import NBDClient
from ..proto.constants import BASE_ALLOCATION, MAX_BLOCK_STATUS_EXTENTS, Command
from ..proto.errors import NBDError, ReplyError
from ..proto.extents import Extent
from .export import Export, Segment
from .upstream_links import UpstreamLinks

log = logging.getLogger(__name__)

# Longest zeroing or trim sent upstream in one request (compact headers: 32-bit lengths).
MAX_UPSTREAM_LENGTH = (1 << 32) - (1 << 20)


def _os_error(what: str, error: NBDError) -> OSError:
    """QEMU's errno passes through to the client (ENOSPC, ENOTSUP, …); else EIO."""
    code = error.errno if isinstance(error, ReplyError) and error.errno else errno.EIO
    return OSError(code, f"{what}: {error}")


class RestoreExport(Export):
    """``restore/ID`` of a restore session."""

    relays_reads = True
    writable = True
    multi_conn = True

    def __init__(self, name: str, size: int, address: Address, upstream_export: str) -> None:
        super().__init__(name, size, "restore target (writable)")
        self.address = address
        self.upstream_export = upstream_export
        self.written_bytes = 0
        self._shared: NBDClient | None = None
        self._connecting = asyncio.Lock()
        self.links = UpstreamLinks(address, upstream_export)

    @property
    def contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    async def open_upstream(self) -> NBDClient:
        if self.closed:
            raise OSError(errno.ESHUTDOWN, "export is gone")
        return await self.links.open(lambda: self.closed)

    async def _client(self) -> NBDClient:
        async with self._connecting:
            if self._shared is None or self._shared.closed:
                try:
                    self._shared = await NBDClient.connect(
                        self.address, self.upstream_export, contexts=[BASE_ALLOCATION]
                    )
                except (OSError, NBDError) as e:
                    raise OSError(errno.EIO, f"connecting to QEMU: {e}") from e
            return self._shared

    async def read(self, offset: int, length: int) -> list[Segment]:
        client = await self._client()
        try:
            data = await client.read(offset, length)
        except NBDError as e:
            raise _os_error("reading from QEMU", e) from e
        return [(offset, length, data)]

    async def extents(
        self, context: str, offset: int, length: int, limit: int = MAX_BLOCK_STATUS_EXTENTS
    ) -> list[Extent]:
        if context != BASE_ALLOCATION:
            raise OSError(errno.EINVAL, f"unknown context {context}")
        client = await self._client()
        try:
            status = await client.block_status(
                offset, min(length, MAX_UPSTREAM_LENGTH), req_one=limit == 1
            )
        except NBDError as e:
            raise _os_error("block status from QEMU", e) from e
        return status.get(BASE_ALLOCATION, [])

    async def write(self, offset: int, data: bytes, flags: int) -> None:
        client = await self._client()
        try:
            await client.write(offset, data, flags=flags)
        except NBDError as e:
            raise _os_error("writing through QEMU", e) from e

    async def write_zeroes(self, offset: int, length: int, flags: int) -> None:
        await self._in_pieces(Command.WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int, flags: int) -> None:
        await self._in_pieces(Command.TRIM, offset, length, flags)

    async def _in_pieces(self, command: Command, offset: int, length: int, flags: int) -> None:
        client = await self._client()
        end = offset + length
        try:
            while True:
                n = min(end - offset, MAX_UPSTREAM_LENGTH)
                await client.request(command, flags, offset, n)
                offset += n
                if offset >= end:
                    return
        except NBDError as e:
            raise _os_error(f"{command.name} through QEMU", e) from e

    async def flush(self) -> None:
        client = await self._client()
        try:
            await client.flush()
        except NBDError as e:
            raise _os_error("flushing through QEMU", e) from e

    async def cache(self, offset: int, length: int) -> None:
        client = await self._client()
        try:
            await client.cache(offset, min(length, MAX_UPSTREAM_LENGTH))
        except NBDError as e:
            raise _os_error("cache hint to QEMU", e) from e

    def write_served(self, command: int, offset: int, length: int) -> None:
        self.written_bytes += length

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "kind": "restore", "writable": True}

    async def aclose(self) -> None:
        """Close the export (its clients get ESHUTDOWN) and every connection to QEMU."""
        self.close()
        self.links.abort_all()
        shared, self._shared = self._shared, None
        if shared is not None:
            with contextlib.suppress(Exception):
                await shared.close()
