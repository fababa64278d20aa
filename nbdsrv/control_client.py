"""One request to a local daemon's control socket, for code that needs no more (tests, the
daemon's own helpers); the client library (nbdsrv/client/) does the work."""

from __future__ import annotations

from typing import Any

from .client.sync import Client
from .client.wire import MAX_LINE, result_of

__all__ = ["MAX_LINE", "call", "result_of"]


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    """Send one request to the daemon at the control socket ``path`` and return its result;
    ControlError on any failure (with the daemon's error code when it answered an error)."""
    with Client(control=path, timeout=timeout) as client:
        return client.call(op, args)
