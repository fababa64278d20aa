"""Byte-level tables for STARTTLS and the TLS policies (spec section "TLS support")."""

import pytest

from nbdsrv.proto.server import (
    Disconnect,
    Negotiated,
    Phase,
    ServerConnection,
    StartTLS,
    TLSMode,
)

from . import spec
from .driver import feed, make_catalog

UNKNOWN_OPTION = 99


def start(mode: TLSMode) -> ServerConnection:
    conn = ServerConnection(make_catalog(), mode)
    conn.data_to_send()
    assert conn.receive(spec.u32(3)) == []
    return conn


def replies(data: bytes) -> list[tuple[int, int]]:
    return [(r.option, r.type) for r in spec.parse_option_replies(data)]


def upgraded(mode: TLSMode) -> ServerConnection:
    """A connection whose STARTTLS was acknowledged and whose TLS handshake succeeded."""
    conn = start(mode)
    out = feed(conn, [spec.option(spec.OPT_STARTTLS)])
    assert out.error is None
    assert replies(out.output) == [(spec.OPT_STARTTLS, spec.REP_ACK)]
    assert out.events == [StartTLS()]
    assert conn.phase is Phase.TLS_HANDSHAKE
    conn.tls_established()
    return conn


def test_starttls_without_tls_configured_is_refused_by_policy() -> None:
    out = feed(start(TLSMode.OFF), [spec.option(spec.OPT_STARTTLS)])
    assert replies(out.output) == [(spec.OPT_STARTTLS, spec.REP_ERR_POLICY)]
    assert out.events == []


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_starttls_is_acknowledged_and_asks_for_the_tls_handshake(mode: TLSMode) -> None:
    conn = upgraded(mode)
    assert conn.tls and conn.phase is Phase.OPTIONS


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_starttls_with_data_is_invalid(mode: TLSMode) -> None:
    conn = start(mode)
    out = feed(conn, [spec.option(spec.OPT_STARTTLS, b"x")])
    assert replies(out.output) == [(spec.OPT_STARTTLS, spec.REP_ERR_INVALID)]
    assert out.events == [] and conn.phase is Phase.OPTIONS


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_bytes_after_starttls_before_the_handshake_are_a_protocol_error(mode: TLSMode) -> None:
    # The client must wait for the ACK; whatever it sent on top cannot be TLS for us.
    conn = start(mode)
    out = feed(conn, [spec.option(spec.OPT_STARTTLS) + b"\x16\x03\x01"])
    assert out.error is not None
    assert replies(out.output) == [(spec.OPT_STARTTLS, spec.REP_ACK)]


def test_a_second_starttls_is_invalid() -> None:
    conn = upgraded(TLSMode.REQUIRE)
    out = feed(conn, [spec.option(spec.OPT_STARTTLS)])
    assert replies(out.output) == [(spec.OPT_STARTTLS, spec.REP_ERR_INVALID)]
    assert out.events == []


@pytest.mark.parametrize(
    ("option", "data"),
    [
        (spec.OPT_LIST, b""),
        (spec.OPT_INFO, spec.info_data("disk")),
        (spec.OPT_GO, spec.info_data("disk")),
        (spec.OPT_STRUCTURED_REPLY, b""),
        (spec.OPT_EXTENDED_HEADERS, b""),
        (spec.OPT_LIST_META_CONTEXT, spec.meta_data("disk")),
        (spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",))),
        (UNKNOWN_OPTION, b"some data"),
    ],
    ids=["list", "info", "go", "structured", "extended", "list-meta", "set-meta", "unknown"],
)
def test_require_answers_every_option_before_tls_with_tls_reqd(option: int, data: bytes) -> None:
    conn = start(TLSMode.REQUIRE)
    out = feed(conn, [spec.option(option, data)])
    assert (out.error, out.events) == (None, [])
    assert replies(out.output) == [(option, spec.REP_ERR_TLS_REQD)]
    # ... and negotiation goes on: the same option works after TLS.
    conn.data_to_send()
    assert feed(conn, [spec.option(spec.OPT_STARTTLS)]).events == [StartTLS()]


def test_require_closes_the_connection_on_export_name_before_tls() -> None:
    out = feed(start(TLSMode.REQUIRE), [spec.option(spec.OPT_EXPORT_NAME, b"disk")])
    assert out.error is not None and out.output == b""


def test_require_acknowledges_abort_before_tls() -> None:
    out = feed(start(TLSMode.REQUIRE), [spec.option(spec.OPT_ABORT)])
    assert replies(out.output) == [(spec.OPT_ABORT, spec.REP_ACK)]
    assert isinstance(out.events[0], Disconnect)


def test_require_serves_after_tls() -> None:
    conn = upgraded(TLSMode.REQUIRE)
    out = feed(conn, [spec.option(spec.OPT_GO, spec.info_data("disk"))])
    assert isinstance(out.events[-1], Negotiated)


def test_on_serves_plain_clients_too() -> None:
    out = feed(start(TLSMode.ON), [spec.option(spec.OPT_GO, spec.info_data("disk"))])
    assert isinstance(out.events[-1], Negotiated)


def test_negotiation_before_tls_is_forgotten_after_it() -> None:
    conn = start(TLSMode.ON)
    hello = spec.option(spec.OPT_STRUCTURED_REPLY) + spec.option(
        spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",))
    )
    assert feed(conn, [hello]).error is None
    assert feed(conn, [spec.option(spec.OPT_STARTTLS)]).events == [StartTLS()]
    conn.tls_established()
    assert not conn.structured
    out = feed(conn, [spec.option(spec.OPT_GO, spec.info_data("disk"))])
    negotiated = out.events[-1]
    assert isinstance(negotiated, Negotiated)
    assert (negotiated.structured, negotiated.contexts) == (False, ())


def test_receive_handles_at_most_limit_messages_and_keeps_the_rest() -> None:
    conn = start(TLSMode.OFF)
    three = spec.option(spec.OPT_LIST) * 3
    conn.receive(three, limit=1)
    assert conn.backlog
    first = replies(conn.data_to_send())
    assert first.count((spec.OPT_LIST, spec.REP_ACK)) == 1
    conn.receive(b"", limit=5)
    assert not conn.backlog
    assert replies(conn.data_to_send()).count((spec.OPT_LIST, spec.REP_ACK)) == 2


def test_a_partial_message_left_at_the_limit_is_no_backlog_once_parsed() -> None:
    conn = start(TLSMode.OFF)
    conn.receive(spec.option(spec.OPT_LIST) + spec.option(spec.OPT_LIST)[:5], limit=1)
    assert conn.backlog  # bytes are left; the next call finds them incomplete
    conn.receive(b"", limit=1)
    assert not conn.backlog
