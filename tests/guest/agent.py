"""A synchronous client of the QEMU guest agent (qemu-ga) on its virtio-serial chardev.

The agent speaks QMP's JSON without greeting or capabilities. A client that connects may
find replies meant for an earlier one in the channel, so every connection starts with
`guest-sync-delimited` and skips everything up to the 0xFF byte the agent sends before
the answer carrying its own random id.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from typing import Any


class AgentError(Exception):
    pass


@dataclass(frozen=True)
class Exec:
    """The end of a `guest-exec`."""

    exitcode: int
    out: str
    err: str


class GuestAgent:
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def sync(self, timeout: float) -> None:
        """Wait until the agent answers (it may still be booting), dropping stale replies."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(1.0)
        try:
            while True:
                ident = random.randrange(1, 1 << 31)
                self._send("guest-sync-delimited", id=ident)
                try:
                    if self._await_sync(ident):
                        return
                except TimeoutError:
                    pass  # not up yet: ask again (each request gets its own 0xFF)
                if time.monotonic() > deadline:
                    raise AgentError(f"the guest agent did not answer in {timeout:g} s")
        finally:
            self.sock.settimeout(self.timeout)

    def _await_sync(self, ident: int) -> bool:
        while True:
            while b"\xff" not in self.buffer:
                self.buffer = b""
                self._receive()
            self.buffer = self.buffer.partition(b"\xff")[2]
            reply = json.loads(self._readline())
            if reply.get("return") == ident:
                return True

    def _receive(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise AgentError("guest agent connection closed")
        self.buffer += chunk

    def _readline(self) -> bytes:
        while b"\n" not in self.buffer:
            self._receive()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def _send(self, command: str, **arguments: Any) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def execute(self, command: str, **arguments: Any) -> Any:
        self._send(command, **arguments)
        reply = json.loads(self._readline())
        if "error" in reply:
            raise AgentError(f"{command}: {reply['error']['desc']}")
        return reply["return"]

    def run(self, script: str, timeout: float = 60.0) -> Exec:
        """`sh -c script` in the guest, to its end."""
        pid = self.execute(
            "guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True}
        )["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", pid=pid)
            if status["exited"]:
                return Exec(
                    int(status.get("exitcode", -1)),
                    base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                    base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
                )
            if time.monotonic() > deadline:
                raise AgentError(f"guest command still running after {timeout:g} s: {script}")
            time.sleep(0.05)

    def check(self, script: str, timeout: float = 60.0) -> str:
        """`sh -c script` in the guest, which must exit 0; its stdout."""
        result = self.run(script, timeout)
        if result.exitcode != 0:
            raise AgentError(
                f"guest command failed with status {result.exitcode}: {script}\n"
                f"stdout: {result.out}\nstderr: {result.err}"
            )
        return result.out

    def close(self) -> None:
        self.sock.close()
