"""nbdsrv's NBD server (nbdsrv.net.server.NBDServer) in the test's own event loop, listening
on a unix socket: for tests that look inside the server while real clients talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.net.address import Address
from nbdsrv.net.server import NBDServer, ServerPolicy


async def start_server(
    catalog: ExportCatalog, socket: str | Path, policy: ServerPolicy | None = None
) -> tuple[NBDServer, Address]:
    """A server of ``catalog`` listening on the unix socket ``socket``, and its address."""
    server = NBDServer(catalog, policy)
    address = Address("unix", path=str(socket))
    await server.listen(address)
    return server, address


@asynccontextmanager
async def serving(
    catalog: ExportCatalog, socket: str | Path, policy: ServerPolicy | None = None
) -> AsyncIterator[tuple[NBDServer, Address]]:
    """``start_server``; at the end the server stops (unless the test stopped it) and the
    catalog's exports are closed."""
    server, address = await start_server(catalog, socket, policy)
    try:
        yield server, address
    finally:
        if not server.stopping:
            await server.stop()
        catalog.close_all()
