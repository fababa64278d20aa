"""The client side of the control socket (control.py): one JSON-lines request, one answer."""

from __future__ import annotations

import json
import socket
from typing import Any

from .errors import ControlError

# One request or response line; status of a big daemon stays far below this.
MAX_LINE = 16 * 1024 * 1024


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    """Send one request to a daemon and return its result; ControlError on any failure (with
    the daemon's error code when the daemon answered with an error)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        line = sock.makefile("rb").readline(MAX_LINE)
    except FileNotFoundError:
        raise ControlError(f"no daemon at {path} (control socket not found)") from None
    except ConnectionRefusedError:
        raise ControlError(f"no daemon at {path} (connection refused)") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    return result_of(line, f"the daemon at {path}")


def result_of(line: bytes, daemon: str) -> Any:
    """The result in a response line, or the ControlError it carries."""
    if not line:
        raise ControlError(f"{daemon} closed the connection without answering")
    try:
        response = json.loads(line)
        ok = response["ok"]
        if not ok:
            error = response["error"]
            raise ControlError(str(error["message"]), str(error["code"]))
        return response["result"]
    except (ValueError, KeyError, TypeError):
        raise ControlError(f"{daemon} answered something that is not a response") from None
