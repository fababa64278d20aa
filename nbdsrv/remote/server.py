"""The control protocol over TLS on TCP (``--remote tcp:HOST:PORT``), for backup servers.

The port speaks TLS (1.2 or later) from the first byte, and every client must present a
certificate the daemon's ``--tls-ca`` signed. Requests and answers are the control socket's
(control.py: one JSON object a line), limited to the VMs the certificate is granted
(grants.py). Every request and refusal is logged to ``nbdsrv.audit`` with the subject.

Limits against slow and hostile clients, each connection being its own task:

- at most ``max_connections`` connections in the TLS handshake: a new one pushes out the
  oldest (so a flood of silent connections never keeps a real client out), and each has
  ``handshake_timeout`` seconds to finish;
- at most ``max_connections`` clients past the handshake; more are answered ``limit``;
- a request line of at most MAX_REQUEST bytes (``limit``, then the connection closes), read
  one at a time: the next is left in the kernel until the answer is written;
- ``idle_timeout`` seconds (REMOTE_IDLE_TIMEOUT when the daemon's is 0, "never") for the next
  request line to arrive whole and for each answer to be taken by the client.

    accept ──▶ pending (reading paused) ──start_tls──▶ client ──▶ line ▶ answer ▶ line …
                 │ oldest pushed out / timeout          │ limit / idle / EOF
                 ▼                                       ▼
               closed, audited                         closed, audited
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from ..control import Handler, answer, control_peer, error_response
from ..errors import BadRequestError, LimitError, NbdsrvError
from ..net.access import Peer, subject_of
from ..net.address import Address
from ..operations import Operation
from .connection import NotTLS, RemoteConnection
from .grants import Grants, RemoteView

log = logging.getLogger(__name__)
audit = logging.getLogger("nbdsrv.audit")

# A request line (requests are small; answers may be larger, status of a big daemon).
MAX_REQUEST = 1024 * 1024
# The idle timeout of remote control clients when the daemon's --idle-timeout is 0.
REMOTE_IDLE_TIMEOUT = 300.0
# After refusing a request line that is too long: how long the rest is read and dropped, so
# that the client reads the answer instead of a reset.
LINGER = 2.0


@dataclass(frozen=True)
class RemoteLimits:
    max_connections: int  # 0: no limit
    handshake_timeout: float  # 0: none
    idle_timeout: float  # 0: REMOTE_IDLE_TIMEOUT

    @property
    def idle(self) -> float:
        return self.idle_timeout or REMOTE_IDLE_TIMEOUT


class RemoteControlServer:
    def __init__(
        self,
        address: Address,
        context: ssl.SSLContext,
        grants: Grants,
        handlers: dict[str, Handler],
        limits: RemoteLimits,
    ) -> None:
        self.address = address
        self._context = context
        self._grants = grants
        self._handlers = handlers
        self._limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._pending: dict[RemoteConnection, None] = {}  # oldest first
        self._clients: set[RemoteConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self.address.host, self.address.port, reuse_address=True
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = Address("tcp", host=host, port=port)
        log.info("remote control on %s (TLS)", self.address)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for connection in [*self._pending, *self._clients]:
            if connection.transport is not None:
                connection.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self) -> RemoteConnection:
        return RemoteConnection(self._context, MAX_REQUEST, self._connected)

    def _connected(self, connection: RemoteConnection) -> None:
        limit = self._limits.max_connections
        if limit and len(self._pending) >= limit:
            oldest = next(iter(self._pending))
            self._pending.pop(oldest)
            audit.warning(
                "remote control: dropped %s in the TLS handshake (%d connections in it)",
                _address(oldest),
                limit,
            )
            if oldest.transport is not None:
                oldest.transport.abort()
        self._pending[connection] = None
        task = asyncio.get_running_loop().create_task(self._serve(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: RemoteConnection) -> None:
        address = _address(connection)
        try:
            async with asyncio.timeout(self._limits.handshake_timeout or None):
                await connection.handshake
        except NotTLS:
            audit.warning("remote control: refused %s: not TLS", address)
            assert connection.transport is not None
            connection.transport.write(json.dumps(error_response(_NOT_TLS)).encode() + b"\n")
            connection.transport.close()
            return
        except (OSError, ssl.SSLError, ValueError, TimeoutError) as e:
            reason = "timed out" if isinstance(e, TimeoutError) else _reason(e)
            audit.warning("remote control: refused %s: TLS handshake failed: %s", address, reason)
            if connection.transport is not None:
                connection.transport.close()  # after the alert that tells the client why
            return
        finally:
            self._pending.pop(connection, None)
        peer = Peer(address, subject_of(connection.peer_certificate))
        who = f"subject={peer.subject_text()} addr={address}"
        control_peer.set(who)  # this task's context: the audit lines of the handlers
        limit = self._limits.max_connections
        if limit and len(self._clients) >= limit:
            await self._refuse(
                connection, who, LimitError(f"too many remote control clients ({limit})")
            )
            connection.close()
            return
        self._clients.add(connection)
        audit.info("remote control: connected %s", who)
        try:
            await self._conversation(connection, self._grants.view(peer), who)
        finally:
            self._clients.discard(connection)
            connection.close()

    async def _conversation(self, connection: RemoteConnection, view: RemoteView, who: str) -> None:
        idle = self._limits.idle
        while True:
            try:
                async with asyncio.timeout(idle):
                    line = await connection.next_line()
            except TimeoutError:
                audit.info("remote control: closed %s: idle for %g s", who, idle)
                return
            if connection.overrun:
                await self._refuse(
                    connection, who, LimitError(f"request line longer than {MAX_REQUEST} bytes")
                )
                await connection.drop_input(LINGER)
                return
            if line is None:
                why = f" ({connection.error})" if connection.error else ""
                audit.info("remote control: %s disconnected%s", who, why)
                return
            response = await _Request(view, self._handlers).answer(line, who)
            try:
                async with asyncio.timeout(idle):
                    await connection.write(json.dumps(response).encode() + b"\n")
            except TimeoutError:
                audit.info("remote control: closed %s: answer not taken for %g s", who, idle)
                return

    async def _refuse(self, connection: RemoteConnection, who: str, error: NbdsrvError) -> None:
        audit.warning("remote control: refused %s: %s", who, error)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._limits.idle):
                await connection.write(json.dumps(error_response(error)).encode() + b"\n")


class _Request:
    """One remote request: checked against the grants, carried out, filtered, audited."""

    def __init__(self, view: RemoteView, handlers: dict[str, Handler]) -> None:
        self._view = view
        self._handlers = handlers
        self._op = "-"
        self._details = "-"
        self._refused = True  # until the grants let it through

    async def answer(self, line: bytes, who: str) -> dict[str, Any]:
        response = await answer(line, self._dispatch)
        if response["ok"]:
            audit.info("remote control: %s %s by %s: ok", self._op, self._details, who)
            return response
        error = response["error"]
        audit.warning(
            "remote control: %s %s %s by %s: %s: %s",
            "refused" if self._refused else "failed",
            self._op,
            self._details,
            who,
            error["code"],
            error["message"],
        )
        return response

    async def _dispatch(self, op: Operation, args: dict[str, Any]) -> Any:
        self._op = op.name
        given = [f"{k}={v}" for k, v in args.items() if v is not None and v is not False]
        self._details = " ".join(given) or "-"
        self._view.check(op, args)
        self._refused = False
        return self._view.filter(op, await self._handlers[op.name](args))


_NOT_TLS = BadRequestError(
    "this port speaks TLS only: connect with TLS and a client certificate (docs/api.md)"
)


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"client certificate refused: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e)
    return str(e) or type(e).__name__


def _address(connection: RemoteConnection) -> str:
    if connection.transport is None:
        return "?"
    peername = connection.transport.get_extra_info("peername")
    return str(peername[0]) if peername else "?"
