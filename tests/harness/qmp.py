"""The test's own monitor on a QEMU under test: qemu.qmp's synchronous client, connected."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.harness.tools import TIMEOUT


class SyncQMP(QEMUMonitorProtocol):
    """qemu.qmp's synchronous client, connected to ``path``: ``cmd(name, **arguments)``
    returns QEMU's answer or raises ``qemu.qmp.ExecuteError``."""

    def __init__(self, path: str | Path, timeout: float = TIMEOUT) -> None:
        super().__init__(str(path))
        self.settimeout(timeout)
        self.connect()

    def hmp(self, command: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": command}))

    def quit(self) -> None:
        """Make QEMU exit, and close (QEMU's hang-up may come first: that is no error)."""
        self.cmd("quit")
        with contextlib.suppress(EOFError):
            self.close()

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        """Name → QEMU's info of every dirty bitmap on ``node``."""
        for info in self.cmd("query-named-block-nodes", flat=True):
            if info["node-name"] == node:
                return {b["name"]: b for b in info.get("dirty-bitmaps", [])}
        raise KeyError(node)
