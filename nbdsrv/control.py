"""The control socket: JSON lines over a unix socket, mode 0600.

Only the daemon's own user and root may use it: besides the socket's mode, each client's
credentials (SO_PEERCRED) are checked, and others get one error answer and are closed.

Request:  ``{"op": "status", "args": {...}}`` (the operations: operations.py)
Response: ``{"ok": true, "result": ...}`` or
          ``{"ok": false, "error": {"code": "not-found", "message": "..."}}`` (the codes:
          errors.py)

The same requests come over TLS from remote clients (remote/server.py); both answer each line
with :func:`answer`.
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from .client.wire import MAX_LINE
from .control_requests import parse_request
from .errors import InternalError, NbdsrvError, PermissionDeniedError
from .net.socket_path import clear_stale_socket
from .operations import Operation

log = logging.getLogger(__name__)

__all__ = ["ControlServer", "answer", "control_peer", "error_response", "peer_credentials"]

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
# Carries out one checked request: (operation, args) → result.
Dispatch = Callable[[Operation, dict[str, Any]], Awaitable[Any]]
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# Who sent the control request being handled ("uid=0 pid=123"), for audit lines.
control_peer: ContextVar[str] = ContextVar("control_peer", default="-")


def peer_credentials(sock: object) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket's peer, or None where the system cannot tell."""
    getsockopt = getattr(sock, "getsockopt", None)
    if getsockopt is None:
        return None
    try:
        data = getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        clear_stale_socket(self.path)  # never another daemon's live socket
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        if self._server is None:
            return  # never started: whatever is at the path is not ours
        self._server.close()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        credentials = peer_credentials(writer.get_extra_info("socket"))
        if credentials is None or credentials[1] not in (os.getuid(), 0):
            who = f"uid {credentials[1]}" if credentials else "a peer of unknown uid"
            log.warning("control socket: refused %s (not the daemon's user or root)", who)
            error = _error(PermissionDeniedError(f"permission denied for {who}"))
            with contextlib.suppress(ConnectionError, ValueError, TimeoutError):
                # Take the request first: closing with it unread would reset the connection
                # before the client reads the answer.
                await asyncio.wait_for(reader.readline(), 5)
                writer.write(json.dumps({"ok": False, "error": error}).encode() + b"\n")
                await writer.drain()
            writer.close()
            return
        control_peer.set(f"uid={credentials[1]} pid={credentials[0]}")
        try:
            while line := await reader.readline():
                response = await self._answer(line)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as e:
            log.debug("control client: %s", e)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        return await answer(line, self._dispatch)

    async def _dispatch(self, op: Operation, args: dict[str, Any]) -> Any:
        return await self._handlers[op.name](args)


async def answer(line: bytes, dispatch: Dispatch) -> dict[str, Any]:
    """The response to one request line: checked (control_requests.py), then ``dispatch``ed."""
    try:
        op, args = parse_request(line)
        return {"ok": True, "result": await dispatch(op, args)}
    except NbdsrvError as e:
        return error_response(e)
    except Exception as e:
        # A bug of ours, not the request's: logged in full, answered in one line.
        log.exception("control operation failed")
        return error_response(InternalError(f"internal error: {e}"))


def error_response(error: NbdsrvError) -> dict[str, Any]:
    """``{"ok": false, "error": {"code", "message"}}``: the stable code and the sentence."""
    return {"ok": False, "error": _error(error)}


def _error(error: NbdsrvError) -> dict[str, str]:
    """The error object of a response: the stable code and the sentence."""
    return {"code": error.code, "message": str(error)}
