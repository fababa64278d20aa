"""The client side of the control socket (nbdsrv.control): one JSON-lines request, one answer.
Kept apart, with nothing but the standard library, so that a client command starts fast."""

from __future__ import annotations

# _socket is the C module under `socket`: socket.py builds its enums (AddressFamily,
# SocketKind, ...) at import, a seventh of a client command's start-up, for nothing one
# request needs.
import _socket

from . import client_json
from .errors import ControlError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see cli.py)
if TYPE_CHECKING:
    from typing import Any

# One request or response line; status of a big daemon stays far below this.
MAX_LINE = 16 * 1024 * 1024


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    """Send one request to a daemon and return its result; ControlError on any failure."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(client_json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        line = _read_line(sock)
    except FileNotFoundError:
        raise ControlError(f"no daemon at {path} (control socket not found)") from None
    except ConnectionRefusedError:
        raise ControlError(f"no daemon at {path} (connection refused)") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not line:
        raise ControlError(f"the daemon at {path} closed the connection without answering")
    response = client_json.loads(line)
    if not response.get("ok"):
        raise ControlError(response["error"]["message"])
    return response["result"]


def _read_line(sock: _socket.socket) -> bytes:
    """Bytes up to and including the first newline (or the end of the stream), at most
    MAX_LINE of them, as ``readline(MAX_LINE)`` reads them."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_LINE:
        chunk = sock.recv(min(65536, MAX_LINE - size))
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[: end + 1])
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
