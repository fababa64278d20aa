"""The blocking client: one connection to one daemon, requests one at a time."""

from __future__ import annotations

import select
import socket
from types import TracebackType
from typing import Any, BinaryIO

from ..errors import ControlError
from .endpoint import Endpoint
from .operations import Operations
from .wire import MAX_LINE, request_line, result_of


class Client(Operations):
    """``Client()`` talks to the local daemon (``$NBDSRV_CONNECT``/``$NBDSRV_CONTROL`` as the
    CLI reads them); ``Client("nbdsrv+tls://host:10810", "/etc/pki/nbdsrv")`` to a remote one.
    Use it as a context manager, or ``close()`` it. Errors: ``ControlError`` with ``.code``."""

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
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result (ControlError on any failure)."""
        daemon = f"the daemon at {self.endpoint}"
        if self._sock is not None and select.select([self._sock], [], [], 0)[0]:
            self.close()  # it closed an idle connection: nothing may be read between requests
        try:
            if self._sock is None:
                self._connect()
            assert self._sock is not None and self._file is not None
            self._sock.sendall(request_line(op, args))
            line = self._file.readline(MAX_LINE + 1)
        except ControlError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise ControlError(_failure(self.endpoint, e)) from None
        if not line.endswith(b"\n"):
            self.close()
        return result_of(line, daemon)

    def _connect(self) -> None:
        endpoint = self.endpoint
        if not endpoint.remote:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(endpoint.path)
            except FileNotFoundError:
                sock.close()
                raise ControlError(f"no daemon at {endpoint} (control socket not found)") from None
            except ConnectionRefusedError:
                sock.close()
                raise ControlError(f"no daemon at {endpoint} (connection refused)") from None
            except OSError:
                sock.close()
                raise
        else:
            context = endpoint.tls_context()
            raw = socket.create_connection((endpoint.host, endpoint.port), self.timeout)
            try:
                sock = context.wrap_socket(raw, server_hostname=endpoint.host)
            except OSError:
                raw.close()
                raise
        self._sock = sock
        self._file = sock.makefile("rb")


def _failure(endpoint: Endpoint, e: OSError) -> str:
    """One sentence for a failure to reach or talk to a daemon."""
    if endpoint.remote:
        import ssl  # loaded already: a local client never loads it

        if isinstance(e, ssl.SSLCertVerificationError):
            return f"the daemon at {endpoint} has a certificate we do not trust: {e.verify_message}"
        if isinstance(e, ssl.SSLError):
            return (
                f"the daemon at {endpoint} refused the TLS connection ({e.reason or e}): does "
                "its CA sign our client certificate?"
            )
    if isinstance(e, ConnectionRefusedError):
        return f"no daemon at {endpoint} (connection refused)"
    if isinstance(e, TimeoutError | socket.timeout):
        return f"the daemon at {endpoint} did not answer in time"
    return f"cannot talk to the daemon at {endpoint}: {e.strerror or e}"
