"""The source of a live restore: an NBD URI, as QEMU's ``nbd`` block driver opens it.

``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH`` and ``nbds://…`` (TLS, with
the daemon's certificates as the client's: see :class:`TLSFiles`). The node is read-only and
has a ``reconnect-delay``: when the source goes away, requests wait that long for it, then
fail with EIO (never zeros), and the next request tries to reconnect.
"""

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..proto.constants import DEFAULT_PORT
from .errors import RestoreError

# Seconds a request waits for a lost source before it fails with EIO.
RECONNECT_DELAY = 5


@dataclass(frozen=True)
class TLSFiles:
    """The daemon's TLS certificate, key and CA: QEMU's ``tls-creds-x509`` wants them as
    ``client-cert.pem``, ``client-key.pem`` and ``ca-cert.pem`` in one directory."""

    cert: str
    key: str
    ca: str | None


@dataclass(frozen=True)
class Source:
    uri: str
    tls: bool
    server: dict[str, str]
    export: str

    def blockdev(self, node: str, tls_creds: str | None) -> dict[str, Any]:
        """``blockdev-add`` arguments of the read-only nbd node named ``node``."""
        options: dict[str, Any] = {
            "driver": "nbd",
            "node-name": node,
            "server": self.server,
            "export": self.export,
            "read-only": True,
            "reconnect-delay": RECONNECT_DELAY,
        }
        if self.tls:
            options["tls-creds"] = tls_creds
        return options


def parse_source(uri: str) -> Source:
    """The source ``uri`` names; RestoreError in one sentence for anything else."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    tls = scheme in ("nbds", "nbds+unix")
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if scheme in ("nbd+unix", "nbds+unix"):
        sockets = parse_qs(parts.query).get("socket")
        if not sockets or not sockets[0]:
            raise RestoreError(f"bad --source {uri!r}: {scheme}:// needs ?socket=PATH")
        return Source(uri, tls, {"type": "unix", "path": sockets[0]}, export)
    if scheme in ("nbd", "nbds"):
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise RestoreError(f"bad --source {uri!r}: the port is not a number") from None
        if not parts.hostname:
            raise RestoreError(f"bad --source {uri!r}: no host")
        return Source(uri, tls, {"type": "inet", "host": parts.hostname, "port": str(port)}, export)
    raise RestoreError(
        f"bad --source {uri!r}: use nbd://HOST[:PORT]/EXPORT, "
        "nbd+unix:///EXPORT?socket=PATH or nbds://…"
    )
