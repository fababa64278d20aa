"""The daemon's remote control options: ``--remote`` and ``--remote-allow`` (docs/api.md)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, NamedTuple

from ..errors import ConfigError

if TYPE_CHECKING:
    import ssl

    from ..net.address import Address
    from ..remote.grants import Grants
    from ..remote.server import RemoteLimits


def add_remote_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("remote control (docs/api.md, docs/fleet.md)")
    group.add_argument(
        "--remote",
        metavar="tcp:HOST:PORT",
        action="append",
        default=[],
        help="serve the control protocol over TLS here, for backup servers on other hosts "
        "(needs --tls-cert, --tls-key and --tls-ca; repeatable)",
    )
    group.add_argument(
        "--remote-allow",
        metavar="VM-PATTERN=subject:ATTR=VALUE[,...]",
        action="append",
        default=[],
        help="remote clients with a matching certificate may see and act on the matching VMs "
        "(repeatable; every other VM stays hidden from them)",
    )


class RemoteConfig(NamedTuple):
    """The remote listeners of a daemon (none by default)."""

    addresses: tuple[Address, ...] = ()
    context: ssl.SSLContext | None = None
    grants: Grants | None = None
    limits: RemoteLimits | None = None


def remote_from_args(args: argparse.Namespace) -> RemoteConfig:
    """The remote listeners the options ask for (none without ``--remote``); ConfigError,
    one line, for what cannot work."""
    from ..net.address import parse_address
    from ..net.tls import server_context
    from ..remote.grants import Grants
    from ..remote.server import RemoteLimits

    if not args.remote:
        if args.remote_allow:
            raise ConfigError("--remote-allow needs --remote tcp:HOST:PORT")
        return RemoteConfig()
    missing = [
        option
        for option, value in (
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
            ("--tls-ca", args.tls_ca),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(
            "--remote needs --tls-cert, --tls-key and --tls-ca (remote clients must present a "
            f"certificate the CA signed): {', '.join(missing)} missing"
        )
    addresses = []
    for text in args.remote:
        address = parse_address(text)
        if address.kind != "tcp":
            raise ConfigError(f"--remote {text}: use tcp:HOST:PORT")
        addresses.append(address)
    return RemoteConfig(
        addresses=tuple(addresses),
        context=server_context(args.tls_cert, args.tls_key, args.tls_ca),
        grants=Grants.parse(args.remote_allow),
        limits=RemoteLimits(
            max_connections=args.max_connections,
            handshake_timeout=args.handshake_timeout,
            idle_timeout=args.idle_timeout,
        ),
    )
