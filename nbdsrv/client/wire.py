"""The control protocol's framing, for both clients: one JSON object a line (docs/api.md)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ControlError

# One request or response line; status of a big daemon stays far below this.
MAX_LINE = 16 * 1024 * 1024


def request_line(op: str, args: dict[str, Any] | None) -> bytes:
    return json.dumps({"op": op, "args": args or {}}).encode() + b"\n"


def result_of(line: bytes, daemon: str) -> Any:
    """The result in a response line, or the ControlError it carries (``code``: the daemon's
    error code, docs/api.md)."""
    if not line:
        raise ControlError(f"{daemon} closed the connection without answering")
    if not line.endswith(b"\n"):
        raise ControlError(f"{daemon} sent an answer longer than {MAX_LINE} bytes")
    try:
        response = json.loads(line)
        ok = response["ok"]
        if not ok:
            error = response["error"]
            raise ControlError(str(error["message"]), str(error["code"]))
        return response["result"]
    except (ValueError, KeyError, TypeError):
        raise ControlError(f"{daemon} answered something that is not a response") from None
