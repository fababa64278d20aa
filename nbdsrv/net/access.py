"""Who may use which export: allow rules by source address and client certificate subject.

``--allow PATTERN=RULE`` (repeatable). PATTERN is an export name or a shell pattern over
export names (``vm1/*``, ``*``); RULE is one of

- ``cidr:NET``    the client connects over TCP from NET (``10.0.0.0/8``, ``::1/128``, a bare
                  address is a /32 or /128),
- ``unix``        the client connects over a unix listen socket,
- ``subject:A=V[,A=V...]``  the client's verified certificate subject has every attribute A
                  with value V (V may be a shell pattern); attributes use the usual short
                  names (CN, O, OU, C, L, ST, DC, emailAddress).

An export that no pattern matches is open to every client the TLS policy admits. For an
export that some patterns match, the rules of all of them are gathered and a client must
match at least one *address* rule (``cidr``/``unix``) if there are any, and at least one
*subject* rule if there are any: address and identity are checked independently, so
``--allow d=cidr:10.0.0.0/8 --allow d=subject:CN=backup`` means "from 10/8 and with the
certificate CN=backup". A client that is not allowed sees the export as absent (not listed,
``NBD_REP_ERR_UNKNOWN``), so names of exports it may not use are not revealed.
"""

import fnmatch
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# OpenSSL long names (as ssl.getpeercert() gives them) → the short names of RFC 4514.
SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
    "userId": "UID",
}


@dataclass(frozen=True)
class Peer:
    """What access rules can know about a client."""

    address: str | None  # IP address for TCP clients, None over a unix socket
    subject: tuple[tuple[str, str], ...] | None = None  # verified certificate, RFC 4514 order

    def subject_text(self) -> str | None:
        if self.subject is None:
            return None
        return ",".join(f"{k}={v}" for k, v in self.subject)


@dataclass(frozen=True)
class Rule:
    kind: str  # "cidr", "unix" or "subject"
    network: IPNetwork | None = None
    attributes: tuple[tuple[str, str], ...] = ()

    def matches(self, peer: Peer) -> bool:
        if self.kind == "unix":
            return peer.address is None
        if self.kind == "cidr":
            if peer.address is None or self.network is None:
                return False
            try:
                address = ipaddress.ip_address(peer.address)
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            return address.version == self.network.version and address in self.network
        if peer.subject is None:
            return False
        have: dict[str, list[str]] = {}
        for key, value in peer.subject:
            have.setdefault(key.lower(), []).append(value)
        return all(
            any(fnmatch.fnmatchcase(v, pattern) for v in have.get(key.lower(), []))
            for key, pattern in self.attributes
        )

    @property
    def is_address(self) -> bool:
        return self.kind in ("cidr", "unix")


@dataclass(frozen=True)
class Allow:
    """One ``--allow PATTERN=RULE``."""

    pattern: str
    rule: Rule


def parse_allow(text: str, option: str = "--allow") -> Allow:
    """``PATTERN=cidr:NET`` / ``PATTERN=unix`` / ``PATTERN=subject:A=V,...`` (ConfigError,
    naming ``option``)."""
    pattern, sep, rule_text = text.partition("=")
    usage = "use EXPORT=cidr:NET, EXPORT=unix or EXPORT=subject:CN=NAME"
    if not sep or not pattern or not rule_text:
        raise ConfigError(f"bad {option} {text!r}: {usage}")
    kind, _, value = rule_text.partition(":")
    if kind == "unix" and not value:
        return Allow(pattern, Rule("unix"))
    if kind == "cidr" and value:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(
                f"bad {option} {text!r}: {value!r} is not an address or network"
            ) from None
        return Allow(pattern, Rule("cidr", network=network))
    if kind == "subject" and value:
        attributes = []
        for part in value.split(","):
            key, eq, want = part.partition("=")
            if not eq or not key.strip() or not want:
                raise ConfigError(f"bad {option} {text!r}: subject needs ATTRIBUTE=VALUE[,...]")
            attributes.append((key.strip(), want))
        return Allow(pattern, Rule("subject", attributes=tuple(attributes)))
    raise ConfigError(f"bad {option} {text!r}: {usage}")


class AccessPolicy:
    """The allow rules of a daemon, asked once per option that names an export."""

    def __init__(self, allows: Sequence[Allow] = ()) -> None:
        self.allows = tuple(allows)

    @property
    def uses_subjects(self) -> bool:
        return any(not a.rule.is_address for a in self.allows)

    def allowed(self, export: str, peer: Peer) -> bool:
        rules = [a.rule for a in self.allows if fnmatch.fnmatchcase(export, a.pattern)]
        if not rules:
            return True
        addresses = [r for r in rules if r.is_address]
        subjects = [r for r in rules if not r.is_address]
        if addresses and not any(r.matches(peer) for r in addresses):
            return False
        return not subjects or any(r.matches(peer) for r in subjects)


def subject_of(cert: dict[str, object] | None) -> tuple[tuple[str, str], ...] | None:
    """A certificate's subject from ``SSLObject.getpeercert()``, in RFC 4514 order (most
    specific first, as ``openssl x509 -nameopt RFC2253`` and certtool print it)."""
    if not cert:
        return None
    rdns = cert.get("subject")
    if not isinstance(rdns, tuple):
        return None
    attributes: list[tuple[str, str]] = []
    for rdn in rdns:
        for key, value in rdn:
            attributes.append((SHORT_NAMES.get(key, key), value))
    return tuple(reversed(attributes))
