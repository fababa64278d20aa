"""A tiny synchronous QMP client for tests: the test's own monitor on a QEMU under test."""

import json
import socket
from typing import Any


class QMPFailed(Exception):
    pass


class SyncQMP:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return dict(json.loads(line))

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QMPFailed(f"{command}: {reply['error']['desc']}")
            return reply["return"]

    def hmp(self, command: str) -> str:
        return str(self.execute("human-monitor-command", **{"command-line": command}))

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        """Name → QEMU's info of every dirty bitmap on ``node``."""
        for info in self.execute("query-named-block-nodes", flat=True):
            if info["node-name"] == node:
                return {b["name"]: b for b in info.get("dirty-bitmaps", [])}
        raise KeyError(node)

    def close(self) -> None:
        self.file.close()
        self.sock.close()
