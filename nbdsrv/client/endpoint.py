"""Where a daemon is: its control socket, or ``nbdsrv+tls://HOST:PORT`` with a directory of
client certificates (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``, as libnbd and
QEMU read them). ``ssl`` is imported only for a remote endpoint: a local command stays light.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from ..config.paths import default_control
from ..errors import ConfigError, ControlError, UsageError

if TYPE_CHECKING:
    import ssl

SCHEME = "nbdsrv+tls"
DEFAULT_PORT = 10810
# In a --tls-certificates directory, as libnbd and QEMU's tls-creds-x509 read them.
CA_CERT, CLIENT_CERT, CLIENT_KEY = "ca-cert.pem", "client-cert.pem", "client-key.pem"


class Endpoint(NamedTuple):
    """A local control socket (``path``) or a remote daemon (``host``, ``port``). (Not a
    dataclass: ``dataclasses`` would cost every client command's start-up.)"""

    path: str = ""
    host: str = ""
    port: int = 0
    certificates: str = ""

    @property
    def remote(self) -> bool:
        return bool(self.host)

    def __str__(self) -> str:
        if not self.remote:
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}://{host}:{self.port}"

    @classmethod
    def remote_uri(cls, uri: str, certificates: str | None) -> Endpoint:
        """``nbdsrv+tls://HOST[:PORT]`` with its certificate directory."""
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            port = -1
        if parts.scheme != SCHEME or not parts.hostname or port < 0 or parts.path not in ("", "/"):
            raise ConfigError(f"bad daemon address {uri!r}: use {SCHEME}://HOST:PORT")
        if not certificates:
            raise UsageError(
                f"{uri} needs --tls-certificates DIR (with {CA_CERT}, {CLIENT_CERT}, {CLIENT_KEY})"
            )
        return cls(host=parts.hostname, port=port, certificates=certificates)

    @classmethod
    def choose(
        cls,
        connect: str | None = None,
        control: str | None = None,
        tls_certificates: str | None = None,
    ) -> Endpoint:
        """The daemon a client command talks to: ``--connect`` or ``--control`` (not both),
        else ``$NBDSRV_CONNECT``, else ``$NBDSRV_CONTROL``, else the default control socket.
        Certificates: ``tls_certificates``, else ``$NBDSRV_TLS_CERTIFICATES``."""
        if connect and control:
            raise UsageError("--connect and --control exclude each other")
        certificates = tls_certificates or os.environ.get("NBDSRV_TLS_CERTIFICATES")
        if control:
            return cls(path=control)
        uri = connect or os.environ.get("NBDSRV_CONNECT")
        if uri:
            return cls.remote_uri(uri, certificates)
        return cls(path=default_control())

    def tls_context(self) -> ssl.SSLContext:
        """TLS 1.2 or later; the daemon's certificate must be signed by the directory's CA and
        name HOST; ours is presented to it."""
        import ssl

        directory = self.certificates
        for name in (CA_CERT, CLIENT_CERT, CLIENT_KEY):
            if not os.path.isfile(os.path.join(directory, name)):
                raise ControlError(f"no {name} in {directory} (--tls-certificates)")
        try:
            context = ssl.create_default_context(cafile=os.path.join(directory, CA_CERT))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(
                os.path.join(directory, CLIENT_CERT), os.path.join(directory, CLIENT_KEY)
            )
        except FileNotFoundError as e:
            raise ControlError(
                f"cannot read the TLS certificates: {e.filename} not found"
            ) from None
        except (ssl.SSLError, OSError) as e:
            raise ControlError(f"cannot use the TLS certificates in {directory}: {e}") from None
        return context
