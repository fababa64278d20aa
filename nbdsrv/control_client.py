"""The client side of the control socket (nbdsrv.control): one JSON-lines request, one answer.
Kept apart, with nothing but the standard library, so that a client command starts fast."""

import json
import socket
from typing import Any

from .errors import ControlError

# One request or response line; status of a big daemon stays far below this.
MAX_LINE = 16 * 1024 * 1024


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    """Send one request to a daemon and return its result; ControlError on any failure."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            with sock.makefile("rb") as f:
                line = f.readline(MAX_LINE)
    except FileNotFoundError:
        raise ControlError(f"no daemon at {path} (control socket not found)") from None
    except ConnectionRefusedError:
        raise ControlError(f"no daemon at {path} (connection refused)") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from None
    if not line:
        raise ControlError(f"the daemon at {path} closed the connection without answering")
    response = json.loads(line)
    if not response.get("ok"):
        raise ControlError(response["error"]["message"])
    return response["result"]
