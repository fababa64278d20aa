"""Listen addresses: ``tcp:HOST:PORT`` (``tcp:[::1]:10809``) or ``unix:PATH``."""

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def uri(self, export: str) -> str:
        """An NBD URI (doc/uri.md) for ``export`` at this address."""
        if self.kind == "unix":
            return f"nbd+unix:///{export}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("", "0.0.0.0", "[::]"):
            host = "localhost"
        return f"nbd://{host}:{self.port}/{export}"


def parse_address(text: str) -> Address:
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ConfigError(f"bad listen address {text!r}: use tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind != "tcp":
        raise ConfigError(f"bad listen address {text!r}: use tcp:HOST:PORT or unix:PATH")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"bad listen address {text!r}: port missing or invalid")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Address("tcp", host=host, port=int(port))


def parse_uri(uri: str) -> tuple[Address, str]:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH`` → (address, export).
    TLS schemes are not handled here."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(uri)
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets:
            raise ConfigError(f"bad NBD URI {uri!r}: nbd+unix needs ?socket=PATH")
        return Address("unix", path=sockets[0]), export
    if parts.scheme in ("nbd", "nbd+tcp"):
        if not parts.hostname:
            raise ConfigError(f"bad NBD URI {uri!r}: no host")
        return Address("tcp", host=parts.hostname, port=parts.port or 10809), export
    raise ConfigError(f"unsupported NBD URI {uri!r}: use nbd:// or nbd+unix://")
