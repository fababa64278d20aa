"""Waiting for a block export to go.

`block-export-del` only starts an export's removal: QEMU drops it from
`query-block-exports`, and sends BLOCK_EXPORT_DELETED, once its last client has left.
"""

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
