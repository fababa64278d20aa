"""Whole conversations fed at once, a byte at a time, and split anywhere give the same result."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdsrv.proto.server import ServerConnection

from . import spec
from .driver import Outcome, feed, make_catalog

SR = spec.option(spec.OPT_STRUCTURED_REPLY)
EH = spec.option(spec.OPT_EXTENDED_HEADERS)
ALL_CONTEXTS = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0")

CONVERSATIONS: dict[str, bytes] = {
    "simple-session": spec.u32(1)
    + spec.option(spec.OPT_LIST)
    + spec.option(spec.OPT_INFO, spec.info_data("disk", (1, 2, 3)))
    + spec.option(spec.OPT_GO, spec.info_data("disk"))
    + spec.request(spec.CMD_READ, 1, 0, 4096)
    + spec.request(spec.CMD_FLUSH, 2, 0, 0)
    + spec.request(spec.CMD_WRITE, 3, 0, 100, payload=b"w" * 100)
    + spec.request(spec.CMD_READ, 4, 1 << 30, 1)
    + spec.request(spec.CMD_DISC, 5, 0, 0),
    "structured-session": spec.u32(3)
    + SR
    + spec.option(spec.OPT_LIST_META_CONTEXT, spec.meta_data("disk"))
    + spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ALL_CONTEXTS))
    + spec.option(99, b"skip me")
    + spec.option(spec.OPT_GO, spec.info_data("disk", (1,)))
    + spec.request(spec.CMD_BLOCK_STATUS, 1, 0, 65536, spec.FLAG_REQ_ONE)
    + spec.request(spec.CMD_READ, 2, 512, 512, spec.FLAG_DF)
    + spec.request(spec.CMD_READ, 3, 0, 512, 0x8000)
    + spec.request(77, 4, 0, 0)
    + spec.request(spec.CMD_TRIM, 5, 0, 512)
    + spec.request(spec.CMD_DISC, 6, 0, 0),
    "extended-session": spec.u32(3)
    + EH
    + spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",)))
    + spec.option(spec.OPT_GO, spec.info_data("disk"))
    + spec.ext_request(spec.CMD_WRITE, 1, 0, 300, spec.FLAG_PAYLOAD_LEN, payload=b"p" * 300)
    + spec.ext_request(spec.CMD_BLOCK_STATUS, 2, 0, 1 << 40)
    + spec.ext_request(spec.CMD_READ, 3, 4096, 4096)
    + spec.ext_request(spec.CMD_FLUSH, 4, 0, 0)
    + spec.ext_request(spec.CMD_DISC, 5, 0, 0),
    "export-name-zeroes": spec.u32(1)
    + spec.option(spec.OPT_EXPORT_NAME, b"plain")
    + spec.request(spec.CMD_READ, 1, 0, 4096),
    "export-name-no-zeroes": spec.u32(3)
    + SR
    + spec.option(spec.OPT_EXPORT_NAME, b"disk")
    + spec.request(spec.CMD_CACHE, 1, 0, 4096),
    "refusals-then-abort": spec.u32(3)
    + spec.option(spec.OPT_STARTTLS)
    + spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",)))
    + spec.option(spec.OPT_GO, b"\x00\x00\x00\x09disk")
    + spec.option(spec.OPT_INFO, spec.info_data("nosuch"))
    + SR
    + SR
    + spec.option(spec.OPT_ABORT)
    + b"trailing junk after abort",
    "bad-request-magic": spec.u32(3)
    + spec.option(spec.OPT_GO, spec.info_data("disk"))
    + spec.request(spec.CMD_READ, 1, 0, 512)
    + b"\xde\xad\xbe\xef" * 7,
    "bad-client-flags": spec.u32(8) + spec.option(spec.OPT_LIST),
}


def whole(data: bytes) -> Outcome:
    conn = ServerConnection(make_catalog())
    greeting = conn.data_to_send()
    outcome = feed(conn, [data])
    return Outcome(outcome.events, greeting + outcome.output, outcome.error)


def split(data: bytes, cuts: list[int]) -> Outcome:
    conn = ServerConnection(make_catalog())
    greeting = conn.data_to_send()
    bounds = [0, *sorted(set(cuts)), len(data)]
    outcome = feed(conn, [data[a:b] for a, b in itertools.pairwise(bounds)])
    return Outcome(outcome.events, greeting + outcome.output, outcome.error)


def same(a: Outcome, b: Outcome) -> bool:
    """Same bytes out and same error. Events must match too, except that a receive call that
    hits a protocol error returns none: the events of that call are dropped with it (the
    connection closes), so a split input may deliver more of them first."""
    if a.error is None:
        return a == b
    return (a.output, a.error) == (b.output, b.error) and (
        a.events == b.events[: len(a.events)] or b.events == a.events[: len(b.events)]
    )


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_fed_a_byte_at_a_time_gives_the_same_events_and_bytes(name: str) -> None:
    data = CONVERSATIONS[name]
    expected = whole(data)
    assert expected.events or expected.error  # the conversation does something
    assert same(split(data, list(range(1, len(data)))), expected)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_conversation_split_anywhere_gives_the_same_events_and_bytes(
    name: str, data: st.DataObject
) -> None:
    conversation = CONVERSATIONS[name]
    cuts = data.draw(st.lists(st.integers(0, len(conversation)), max_size=12))
    assert same(split(conversation, cuts), whole(conversation))


def test_protocol_error_is_found_at_the_same_byte_either_way() -> None:
    data = CONVERSATIONS["bad-request-magic"]
    bytewise = split(data, list(range(1, len(data))))
    # Fed a byte at a time, everything before the bad header is delivered.
    assert bytewise.error == "bad request magic 0xdeadbeef"
    assert [type(e).__name__ for e in bytewise.events] == ["Negotiated", "Request"]
    assert (whole(data).output, whole(data).error) == (bytewise.output, bytewise.error)
