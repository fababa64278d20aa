"""The NBD links an export opens to QEMU's export for its client connections' relayed
requests (``Export.open_upstream``): one a client connection, all cut when the export goes."""

import errno
import weakref
from collections.abc import Callable

from ..net.address import Address
from ..net.client import NBDClient
from ..proto.errors import NBDError


class UpstreamLinks:
    def __init__(self, address: Address, upstream_export: str) -> None:
        self.address = address
        self.upstream_export = upstream_export
        self._links: weakref.WeakSet[NBDClient] = weakref.WeakSet()

    async def open(self, export_closed: Callable[[], bool]) -> NBDClient:
        """A new link; ESHUTDOWN when the export closed while it was being made (it is then
        cut at once), EIO when QEMU cannot be reached."""
        try:
            link = await NBDClient.connect(self.address, self.upstream_export)
        except (OSError, NBDError) as e:
            raise OSError(errno.EIO, f"connecting to QEMU: {e}") from e
        if export_closed():
            link.abort()
            raise OSError(errno.ESHUTDOWN, "export is gone")
        self._links.add(link)
        return link

    def abort_all(self) -> None:
        for link in list(self._links):
            link.abort()
