"""The daemon's security options (docs/security.md): TLS, allow rules and limits."""

import argparse
import os
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..net.limits import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, POLL_WINDOW

if TYPE_CHECKING:
    from ..net.server import ServerPolicy

# TLSMode's values (proto.server), spelt out: the parser is built for every client command too,
# which must not import the server (tests/control/test_cli_imports.py keeps them equal).
TLS_MODES = ("off", "on", "require")


def add_security_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (docs/security.md)")
    group.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM) for STARTTLS")
    group.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA certificate(s) (PEM): clients must present a certificate signed by it",
    )
    group.add_argument(
        "--tls",
        choices=TLS_MODES,
        help="off: no TLS; on: TLS offered, plain text allowed; require: TLS before anything "
        "(default: require with --tls-cert, else off)",
    )
    group.add_argument(
        "--allow",
        metavar="EXPORT=RULE",
        action="append",
        default=[],
        help="who may use EXPORT (a name or pattern): cidr:NET, unix, or subject:CN=NAME "
        "(repeatable)",
    )
    group.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"NBD connections at once; more are closed at once (default "
        f"{DEFAULT_MAX_CONNECTIONS}, 0: no limit)",
    )
    group.add_argument(
        "--handshake-timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        help=f"drop a client that has not chosen an export by then (default "
        f"{DEFAULT_HANDSHAKE_TIMEOUT:g}, 0: never)",
    )
    group.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="drop a client that sends nothing for this long with nothing in flight "
        "(default 0: never)",
    )


def policy_from_args(args: argparse.Namespace) -> "ServerPolicy":
    """The ServerPolicy the options describe; ConfigError for a contradiction."""
    from ..net.access import AccessPolicy, parse_allow
    from ..net.server import ServerPolicy
    from ..net.tls import server_context
    from ..proto.server import TLSMode

    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if ca is not None and cert is None:
        raise ConfigError("--tls-ca needs --tls-cert and --tls-key")
    mode = TLSMode(args.tls) if args.tls else (TLSMode.REQUIRE if cert else TLSMode.OFF)
    if mode is not TLSMode.OFF and cert is None:
        raise ConfigError(f"--tls {mode.value} needs --tls-cert and --tls-key")
    if mode is TLSMode.OFF and cert is not None:
        raise ConfigError("--tls off contradicts --tls-cert: leave out one of them")
    access = AccessPolicy([parse_allow(text) for text in args.allow])
    if access.uses_subjects and ca is None:
        raise ConfigError("--allow …=subject:… needs --tls-ca (client certificates are verified)")
    for name, value in (
        ("--max-connections", args.max_connections),
        ("--handshake-timeout", args.handshake_timeout),
        ("--idle-timeout", args.idle_timeout),
    ):
        if value < 0:
            raise ConfigError(f"{name} must not be negative")
    return ServerPolicy(
        tls=mode,
        tls_context=server_context(cert, key, ca) if cert is not None else None,
        access=access,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        # For comparisons: 0 makes every connection write through the event loop's transport.
        zero_copy=os.environ.get("NBDSRV_ZERO_COPY", "1") != "0",
        poll_window=poll_window_from_environment(),
    )


def poll_window_from_environment() -> float:
    """NBDSRV_POLL_US: how long to wait for a mapping client's next request (µs); 0 never."""
    text = os.environ.get("NBDSRV_POLL_US")
    if text is None:
        return POLL_WINDOW
    try:
        micros = float(text)
    except ValueError:
        message = f"NBDSRV_POLL_US must be a number of microseconds, not {text!r}"
        raise ConfigError(message) from None
    if not 0 <= micros <= 10_000:
        raise ConfigError("NBDSRV_POLL_US must be between 0 and 10000")
    return micros / 1e6
