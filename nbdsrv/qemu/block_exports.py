"""Block exports: waiting for one to go, and the URI of one on a unix socket.

`block-export-del` only starts an export's removal: QEMU drops it from
`query-block-exports`, and sends BLOCK_EXPORT_DELETED, once its last client has left.
"""

from urllib.parse import quote

from .errors import EventTimeoutError, QEMUError
from .monitor import Monitor, QMPEvent

EXPORT_TIMEOUT = 30.0


async def wait_export_deleted(
    monitor: Monitor, export: str, timeout: float = EXPORT_TIMEOUT
) -> None:
    """Until QEMU no longer lists the export `export` (its id); one query, then events."""

    async def deleted() -> bool:
        exports = await monitor.execute("query-block-exports")
        return not any(info.get("id") == export for info in exports)

    def about(event: QMPEvent) -> bool:
        return event.data.get("id") == export

    try:
        await monitor.wait_until(deleted, "BLOCK_EXPORT_DELETED", about, timeout)
    except EventTimeoutError:
        raise QEMUError(f"{export} is still in query-block-exports after {timeout:g}s") from None


def unix_uri(export: str, socket: str) -> str:
    """The NBD URI (libnbd's doc/uri.md) of ``export`` on the unix socket ``socket``."""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(socket, safe='/')}"
