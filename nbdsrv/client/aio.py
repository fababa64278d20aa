"""The asyncio client: one connection to one daemon, requests one at a time (a lock keeps
concurrent callers in turn; use one client per daemon, or several for parallel requests)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from ..errors import ControlError
from .endpoint import Endpoint
from .operations import AsyncOperations
from .sync import _failure
from .wire import MAX_LINE, request_line, result_of


class AsyncClient(AsyncOperations):
    """``async with AsyncClient("nbdsrv+tls://host:10810", "/etc/pki/nbdsrv") as daemon:
    await daemon.status()``; errors: ``ControlError`` with ``.code``."""

    def __init__(
        self,
        connect: str | None = None,
        tls_certificates: str | None = None,
        *,
        control: str | None = None,
        timeout: float = 600,
    ) -> None:
        self.endpoint = Endpoint.choose(connect, control, tls_certificates)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):  # already gone
                await writer.wait_closed()

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result (ControlError on any failure)."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    if self._reader is not None and self._reader.at_eof():
                        await self.close()  # it closed an idle connection
                    if self._reader is None:
                        await self._connect()
                    assert self._reader is not None and self._writer is not None
                    self._writer.write(request_line(op, args))
                    await self._writer.drain()
                    line = await self._reader.readline()
            except ControlError:
                await self.close()
                raise
            except (OSError, ValueError) as e:  # ValueError: a line over the limit
                await self.close()
                if isinstance(e, OSError):
                    raise ControlError(_failure(self.endpoint, e)) from None
                raise ControlError(f"the daemon at {self.endpoint}: {e}") from None
            if not line.endswith(b"\n"):
                await self.close()
            return result_of(line, f"the daemon at {self.endpoint}")

    async def _connect(self) -> None:
        endpoint = self.endpoint
        if not endpoint.remote:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    endpoint.path, limit=MAX_LINE
                )
            except FileNotFoundError:
                raise ControlError(f"no daemon at {endpoint} (control socket not found)") from None
            return
        self._reader, self._writer = await asyncio.open_connection(
            endpoint.host,
            endpoint.port,
            ssl=endpoint.tls_context(),
            server_hostname=endpoint.host,
            limit=MAX_LINE,
        )
