"""The log lines of NBD connections: each prefixed with its peer, and the audit lines
(nbdsrv.audit) of access denied and of every connection closed."""

import logging
from typing import Any

audit = logging.getLogger("nbdsrv.audit")


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        return f"[{self.extra['peer']}] {msg}", kwargs


def quote(text: str) -> str:
    """A value for a key=value log line: quoted when it has spaces, quotes or nothing."""
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
