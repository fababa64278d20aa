"""A stand-in for the QEMU guest agent (qemu-ga) on a unix socket, whose faults a test sets.

It speaks the agent's protocol as nbdsrv uses it: ``guest-sync-delimited`` (0xFF, then the
id), ``guest-fsfreeze-freeze``, ``-thaw`` and ``-status``, one JSON object per line. What a
real guest cannot be made to do on demand, it does when told:

- ``thaw = "error"``: every thaw answers an error (the guest stays frozen);
- ``thaw = "hang"``: every thaw goes unanswered (the guest stays frozen);
- ``thaw = "ok"``: thaws work again (the agent recovered);
- ``oversize_sync = True``: guest-sync is answered by 100 KiB with no delimiter and no
  newline, then nothing;
- ``stale``: bytes sent before each sync answer (what an earlier client left unread);
- ``oversize_status = True``: guest-fsfreeze-status answers with a 100 KiB line.

Each connection is served by its own thread, as a hostile agent would let many wait.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

OVERSIZE = 100 * 1024


class FakeAgent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.frozen = False
        self.thaw = "ok"
        self.oversize_sync = False
        self.stale = b""
        self.oversize_status = False
        self.commands: list[str] = []
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def count(self, command: str) -> int:
        with self._lock:
            return self.commands.count(command)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._answer(conn, json.loads(line))
        except OSError:
            return

    def _answer(self, conn: socket.socket, message: dict[str, Any]) -> None:
        command = message["execute"]
        with self._lock:
            self.commands.append(command)
        if command == "guest-sync-delimited":
            if self.oversize_sync:
                conn.sendall(b"x" * OVERSIZE)
                return
            reply = b"\xff" + json.dumps({"return": message["arguments"]["id"]}).encode()
            conn.sendall(self.stale + reply + b"\n")
            return
        if command == "guest-fsfreeze-freeze":
            self.frozen = True
            self._reply(conn, {"return": 1})
        elif command == "guest-fsfreeze-status":
            if self.oversize_status:
                self._reply(conn, {"return": "x" * OVERSIZE})
                return
            self._reply(conn, {"return": "frozen" if self.frozen else "thawed"})
        elif command == "guest-fsfreeze-thaw":
            if self.thaw == "hang":
                return
            if self.thaw == "error":
                error = {"class": "GenericError", "desc": "failed to thaw /data: Device busy"}
                self._reply(conn, {"error": error})
                return
            self.frozen = False
            self._reply(conn, {"return": 1})
        else:
            self._reply(conn, {"error": {"class": "CommandNotFound", "desc": command}})

    @staticmethod
    def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
        conn.sendall(json.dumps(reply).encode() + b"\n")
