"""The daemon: exports, listeners and the control socket, from start to clean stop."""

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from .catalog import ExportCatalog
from .control import ControlServer
from .errors import ConfigError
from .net.address import Address
from .net.server import NBDServer
from .sources.file import FileExport

log = logging.getLogger(__name__)


@dataclass
class DaemonConfig:
    state_dir: str
    control: str
    listen: list[Address]
    files: list[tuple[str, str]] = field(default_factory=list)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.catalog = ExportCatalog()
        self.server = NBDServer(self.catalog)
        self.control = ControlServer(config.control, {"status": self._status})
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
            log.info("stopping")
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def start(self) -> None:
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        for name, path in self.config.files:
            try:
                self.catalog.add(FileExport(name, path))
            except OSError as e:
                raise ConfigError(f"cannot export {path} as '{name}': {e.strerror or e}") from e
            except ValueError as e:
                raise ConfigError(str(e)) from e
        for address in self.config.listen:
            try:
                await self.server.listen(address)
            except OSError as e:
                raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from e
        # The control socket comes last: `nbdsrv status` succeeding means ready.
        await self.control.start()

    async def shutdown(self) -> None:
        await self.control.stop()
        await self.server.stop()
        self.catalog.close_all()

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        exports = []
        for export in self.catalog.list_exports():
            info = export.describe()
            info["uris"] = [address.uri(export.name) for address in self.server.addresses]
            exports.append(info)
        return {
            "pid": os.getpid(),
            "state_dir": self.config.state_dir,
            "control": self.config.control,
            "listen": [str(address) for address in self.server.addresses],
            "exports": exports,
            "vms": [],
            "sessions": [],
            "connections": len(self.server.connections),
        }
