"""Byte-level tables for the handshake: greeting, client flags and every option."""

import pytest

from nbdsrv.proto.contexts import MetaContext
from nbdsrv.proto.server import Disconnect, Negotiated, Phase, ServerConnection

from . import spec
from .driver import DISK, DISK_SIZE, PLAIN, FakeCatalog, FakeExport, feed, make_catalog, start

MIB32 = 32 * 1024 * 1024
BLOCK_SIZE_INFO = spec.option_reply(
    spec.OPT_GO, spec.REP_INFO, spec.info_block_size(1, 4096, MIB32)
)


def replies(data: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of every option reply in ``data``."""
    return [(r.option, r.type) for r in spec.parse_option_replies(data)]


def go_works(conn: ServerConnection) -> bool:
    """Negotiation is still alive: a GO for a known export enters transmission."""
    out = feed(conn, [spec.option(spec.OPT_GO, spec.info_data("disk"))])
    return out.error is None and isinstance(out.events[-1], Negotiated)


# -- greeting and client flags -----------------------------------------------------------------


def test_greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_with_no_zeroes() -> None:
    conn = ServerConnection(make_catalog())
    assert conn.data_to_send() == bytes.fromhex("4e42444d4147494349484156454f50540003")


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x2, 0x3])
def test_known_client_flags_start_option_haggling_silently(flags: int) -> None:
    conn = ServerConnection(make_catalog())
    conn.data_to_send()
    out = feed(conn, [spec.u32(flags)])
    assert (out.events, out.output, out.error) == ([], b"", None)
    assert conn.phase is Phase.OPTIONS


@pytest.mark.parametrize("flags", [0x4, 0x5, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flag_is_a_protocol_error(flags: int) -> None:
    conn = ServerConnection(make_catalog())
    conn.data_to_send()
    assert feed(conn, [spec.u32(flags)]).error is not None


def test_bad_option_magic_is_a_protocol_error() -> None:
    conn = start()
    bad = b"IHAVEOPX" + spec.u32(spec.OPT_LIST) + spec.u32(0)
    assert feed(conn, [bad]).error is not None


def test_option_length_over_the_limit_is_a_protocol_error_before_the_data_arrives() -> None:
    conn = start()
    header = spec.L_OPTION.pack(spec.IHAVEOPT, 99, 0xFFFFFFFF)
    assert feed(conn, [header]).error is not None


# -- NBD_OPT_EXPORT_NAME -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_flags", "structured", "expected"),
    [
        (0x1, False, spec.u64(DISK_SIZE) + spec.u16(spec.EXPORT_FLAGS) + bytes(124)),
        (0x3, False, spec.u64(DISK_SIZE) + spec.u16(spec.EXPORT_FLAGS)),
        (0x3, True, spec.u64(DISK_SIZE) + spec.u16(spec.EXPORT_FLAGS_STRUCTURED)),
    ],
    ids=["zero-padding", "no-zeroes", "structured-adds-df"],
)
def test_export_name_of_a_known_export_answers_size_and_flags(
    client_flags: int, structured: bool, expected: bytes
) -> None:
    conn = start(client_flags=client_flags)
    if structured:
        feed(conn, [spec.option(spec.OPT_STRUCTURED_REPLY)])
    out = feed(conn, [spec.option(spec.OPT_EXPORT_NAME, b"disk")])
    assert out.output == expected
    assert out.events == [Negotiated(DISK, (), structured, False)]
    assert conn.phase is Phase.TRANSMISSION


def test_export_name_of_an_unknown_export_is_a_protocol_error() -> None:
    out = feed(start(), [spec.option(spec.OPT_EXPORT_NAME, b"nosuch")])
    assert (out.error is not None, out.output) == (True, b"")


def test_export_name_after_extended_headers_is_a_protocol_error() -> None:
    conn = start()
    feed(conn, [spec.option(spec.OPT_EXTENDED_HEADERS)])
    assert feed(conn, [spec.option(spec.OPT_EXPORT_NAME, b"disk")]).error is not None


# -- NBD_OPT_ABORT, LIST, STARTTLS ---------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked_then_disconnects(data: bytes) -> None:
    conn = start()
    out = feed(conn, [spec.option(spec.OPT_ABORT, data)])
    assert out.output == spec.option_reply(spec.OPT_ABORT, spec.REP_ACK)
    assert out.events == [Disconnect("client sent NBD_OPT_ABORT")]
    assert conn.phase is Phase.CLOSED


def test_input_after_abort_is_ignored() -> None:
    conn = start()
    feed(conn, [spec.option(spec.OPT_ABORT)])
    out = feed(conn, [spec.option(spec.OPT_GO, spec.info_data("disk"))])
    assert (out.events, out.output, out.error) == ([], b"", None)


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    out = feed(start(), [spec.option(spec.OPT_LIST)])
    assert out.output == (
        spec.option_reply(spec.OPT_LIST, spec.REP_SERVER, spec.u32(4) + b"disk" + b"a test disk")
        + spec.option_reply(spec.OPT_LIST, spec.REP_SERVER, spec.u32(5) + b"plain")
        + spec.option_reply(spec.OPT_LIST, spec.REP_ACK)
    )


def test_list_of_an_empty_catalog_is_a_lone_ack() -> None:
    out = feed(start(FakeCatalog()), [spec.option(spec.OPT_LIST)])
    assert out.output == spec.option_reply(spec.OPT_LIST, spec.REP_ACK)


@pytest.mark.parametrize(
    ("opt", "data", "expected"),
    [
        (spec.OPT_LIST, b"x", spec.REP_ERR_INVALID),
        (spec.OPT_STARTTLS, b"", spec.REP_ERR_POLICY),
        (spec.OPT_STARTTLS, b"x", spec.REP_ERR_INVALID),
        (spec.OPT_STRUCTURED_REPLY, b"x", spec.REP_ERR_INVALID),
        (spec.OPT_EXTENDED_HEADERS, b"x", spec.REP_ERR_INVALID),
        (spec.OPT_PEEK_EXPORT, b"", spec.REP_ERR_UNSUP),
        (12, b"", spec.REP_ERR_UNSUP),
        (0, b"", spec.REP_ERR_UNSUP),
        (0xFFFFFFFF, b"some data to skip", spec.REP_ERR_UNSUP),
    ],
    ids=[
        "list-with-data",
        "starttls-without-tls",
        "starttls-with-data",
        "structured-reply-with-data",
        "extended-headers-with-data",
        "peek-export-withdrawn",
        "unknown-12",
        "unknown-0",
        "unknown-max-with-data",
    ],
)
def test_refused_option_gets_one_error_reply_and_negotiation_continues(
    opt: int, data: bytes, expected: int
) -> None:
    conn = start()
    out = feed(conn, [spec.option(opt, data)])
    assert replies(out.output) == [(opt, expected)]
    assert out.events == []
    assert go_works(conn)


def test_error_replies_carry_a_short_utf8_message() -> None:
    out = feed(start(), [spec.option(spec.OPT_STARTTLS)])
    (reply,) = spec.parse_option_replies(out.output)
    assert 0 < len(reply.payload) <= 1000
    reply.payload.decode("utf-8")


# -- NBD_OPT_INFO and NBD_OPT_GO ---------------------------------------------------------------


def info_replies(opt: int, *payloads: bytes) -> bytes:
    return b"".join(spec.option_reply(opt, spec.REP_INFO, p) for p in payloads) + (
        spec.option_reply(opt, spec.REP_ACK)
    )


EXPORT_INFO = spec.info_export(DISK_SIZE, spec.EXPORT_FLAGS)
BLOCK_INFO = spec.info_block_size(1, 4096, MIB32)
NAME_INFO = spec.u16(spec.INFO_NAME) + b"disk"
DESCRIPTION_INFO = spec.u16(spec.INFO_DESCRIPTION) + b"a test disk"


@pytest.mark.parametrize("opt", [spec.OPT_INFO, spec.OPT_GO])
@pytest.mark.parametrize(
    ("infos", "payloads"),
    [
        ((), (EXPORT_INFO, BLOCK_INFO)),
        ((spec.INFO_BLOCK_SIZE,), (EXPORT_INFO, BLOCK_INFO)),
        ((spec.INFO_NAME,), (EXPORT_INFO, NAME_INFO, BLOCK_INFO)),
        ((spec.INFO_DESCRIPTION,), (EXPORT_INFO, DESCRIPTION_INFO, BLOCK_INFO)),
        (
            (spec.INFO_DESCRIPTION, spec.INFO_NAME, spec.INFO_BLOCK_SIZE),
            (EXPORT_INFO, NAME_INFO, DESCRIPTION_INFO, BLOCK_INFO),
        ),
        ((99, 0xFFFF), (EXPORT_INFO, BLOCK_INFO)),
    ],
    ids=["none", "block-size", "name", "description", "all", "unknown-ignored"],
)
def test_info_and_go_send_export_info_requested_infos_block_size_then_ack(
    opt: int, infos: tuple[int, ...], payloads: tuple[bytes, ...]
) -> None:
    conn = start()
    out = feed(conn, [spec.option(opt, spec.info_data("disk", infos))])
    assert out.output == info_replies(opt, *payloads)


def test_info_stays_in_option_haggling() -> None:
    conn = start()
    out = feed(conn, [spec.option(spec.OPT_INFO, spec.info_data("disk"))])
    assert (out.events, conn.phase) == ([], Phase.OPTIONS)


def test_go_enters_transmission_without_zero_padding() -> None:
    conn = start(client_flags=0x1)  # no NO_ZEROES: still no padding after GO's ACK
    out = feed(conn, [spec.option(spec.OPT_GO, spec.info_data("disk"))])
    assert out.output.endswith(spec.option_reply(spec.OPT_GO, spec.REP_ACK))
    assert out.events == [Negotiated(DISK, (), False, False)]
    assert conn.phase is Phase.TRANSMISSION


def test_empty_description_is_not_sent() -> None:
    out = feed(start(), [spec.option(spec.OPT_INFO, spec.info_data("plain", (2,)))])
    assert [r.payload[:2] for r in spec.parse_option_replies(out.output)[:-1]] == [
        spec.u16(spec.INFO_EXPORT),
        spec.u16(spec.INFO_BLOCK_SIZE),
    ]


def test_info_after_structured_reply_advertises_df() -> None:
    conn = start()
    feed(conn, [spec.option(spec.OPT_STRUCTURED_REPLY)])
    out = feed(conn, [spec.option(spec.OPT_INFO, spec.info_data("disk"))])
    first = spec.parse_option_replies(out.output)[0]
    assert first.payload == spec.info_export(DISK_SIZE, spec.EXPORT_FLAGS_STRUCTURED)


@pytest.mark.parametrize("opt", [spec.OPT_INFO, spec.OPT_GO])
def test_info_and_go_for_an_unknown_export_answer_err_unknown_alone(opt: int) -> None:
    conn = start()
    out = feed(conn, [spec.option(opt, spec.info_data("nosuch", (spec.INFO_NAME,)))])
    assert replies(out.output) == [(opt, spec.REP_ERR_UNKNOWN)]
    assert go_works(conn)


@pytest.mark.parametrize("opt", [spec.OPT_INFO, spec.OPT_GO])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        spec.u32(4) + b"disk",  # no info count
        spec.u32(4) + b"disk\x00",  # half an info count
        spec.u32(5) + b"disk" + spec.u16(0),  # name runs into the count
        spec.u32(0xFFFFFFFF) + b"disk" + spec.u16(0),
        spec.u32(4) + b"disk" + spec.u16(2) + spec.u16(1),  # one info short
        spec.u32(4) + b"disk" + spec.u16(0) + spec.u16(1),  # one info too many
        spec.u32(4) + b"disk" + spec.u16(1) + b"\x00",  # half an info
        spec.u32(2) + b"\xff\xfe" + spec.u16(0),  # not UTF-8
        spec.u32(5) + b"di\x00sk" + spec.u16(0),  # NUL in the name
    ],
    ids=[
        "empty",
        "short-name-length",
        "no-count",
        "half-count",
        "name-overruns",
        "huge-name-length",
        "count-too-big",
        "trailing-info",
        "half-info",
        "bad-utf8",
        "nul-in-name",
    ],
)
def test_info_and_go_with_malformed_data_answer_err_invalid(opt: int, data: bytes) -> None:
    conn = start()
    out = feed(conn, [spec.option(opt, data)])
    assert replies(out.output) == [(opt, spec.REP_ERR_INVALID)]
    assert go_works(conn)


# -- NBD_OPT_STRUCTURED_REPLY and NBD_OPT_EXTENDED_HEADERS -------------------------------------


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ([spec.OPT_STRUCTURED_REPLY], [spec.REP_ACK]),
        ([spec.OPT_STRUCTURED_REPLY] * 2, [spec.REP_ACK, spec.REP_ERR_INVALID]),
        ([spec.OPT_EXTENDED_HEADERS], [spec.REP_ACK]),
        ([spec.OPT_EXTENDED_HEADERS] * 2, [spec.REP_ACK, spec.REP_ERR_INVALID]),
        ([spec.OPT_STRUCTURED_REPLY, spec.OPT_EXTENDED_HEADERS], [spec.REP_ACK, spec.REP_ACK]),
        (
            [spec.OPT_EXTENDED_HEADERS, spec.OPT_STRUCTURED_REPLY],
            [spec.REP_ACK, spec.REP_ERR_EXT_HEADER_REQD],
        ),
    ],
    ids=["sr", "sr-twice", "eh", "eh-twice", "sr-then-eh", "eh-then-sr"],
)
def test_reply_format_options_are_acked_once(sequence: list[int], expected: list[int]) -> None:
    conn = start()
    out = feed(conn, [spec.option(o) for o in sequence])
    assert replies(out.output) == list(zip(sequence, expected, strict=True))


@pytest.mark.parametrize(
    ("opt", "structured", "extended"),
    [(spec.OPT_STRUCTURED_REPLY, True, False), (spec.OPT_EXTENDED_HEADERS, True, True)],
)
def test_reply_format_is_reported_in_negotiated(opt: int, structured: bool, extended: bool) -> None:
    conn = start()
    out = feed(conn, [spec.option(opt), spec.option(spec.OPT_GO, spec.info_data("disk"))])
    assert out.events == [Negotiated(DISK, (), structured, extended)]


# -- NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (QEMU's semantics) -----------------


def structured_start(catalog: FakeCatalog | None = None) -> ServerConnection:
    conn = start(catalog)
    feed(conn, [spec.option(spec.OPT_STRUCTURED_REPLY)])
    return conn


def meta_replies(opt: int, data: bytes) -> list[tuple[int, str]]:
    """(id, name) of each META_CONTEXT reply; asserts the final ACK."""
    rs = spec.parse_option_replies(data)
    assert [(r.option, r.type) for r in rs[-1:]] == [(opt, spec.REP_ACK)]
    out = []
    for r in rs[:-1]:
        assert (r.option, r.type) == (opt, spec.REP_META_CONTEXT)
        out.append((int.from_bytes(r.payload[:4], "big"), r.payload[4:].decode()))
    return out


ALL = [
    "base:allocation",
    "qemu:allocation-depth",
    "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:b1",
]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((), ALL),
        (("base:",), ["base:allocation"]),
        (("qemu:",), ALL[1:]),
        (("qemu:dirty-bitmap:",), ALL[2:]),
        (("qemu:allocation-depth",), ["qemu:allocation-depth"]),
        (("qemu:dirty-bitmap:b1",), ["qemu:dirty-bitmap:b1"]),
        (("qemu:dirty-bitmap:b1", "base:allocation", "qemu:dirty-bitmap:b1"), [ALL[0], ALL[3]]),
        (("nbd-server:x", "base:nope", "qemu:dirty-bitmap:zz", "qemu:x", ":", ""), []),
        (("base:", "qemu:"), ALL),
    ],
    ids=[
        "no-query-lists-all",
        "base-prefix",
        "qemu-prefix",
        "bitmap-prefix",
        "exact-depth",
        "exact-bitmap",
        "duplicates-once-in-id-order",
        "unknown-skipped",
        "both-prefixes",
    ],
)
def test_list_meta_context_lists_matching_contexts_with_id_zero(
    queries: tuple[str, ...], expected: list[str]
) -> None:
    conn = structured_start()
    out = feed(conn, [spec.option(spec.OPT_LIST_META_CONTEXT, spec.meta_data("disk", queries))])
    assert meta_replies(spec.OPT_LIST_META_CONTEXT, out.output) == [(0, n) for n in expected]


def test_list_meta_context_with_no_query_lists_every_context_byte_for_byte() -> None:
    conn = structured_start()
    out = feed(conn, [spec.option(spec.OPT_LIST_META_CONTEXT, spec.meta_data("plain"))])
    assert out.output == spec.option_reply(
        spec.OPT_LIST_META_CONTEXT, spec.REP_META_CONTEXT, spec.u32(0) + b"base:allocation"
    ) + spec.option_reply(spec.OPT_LIST_META_CONTEXT, spec.REP_ACK)


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        (("base:allocation",), [(0, ALL[0])]),
        (("qemu:allocation-depth",), [(1, ALL[1])]),
        (("qemu:dirty-bitmap:b0",), [(2, ALL[2])]),
        (("qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"), [(2, ALL[2]), (3, ALL[3])]),
        (tuple(ALL), [(0, ALL[0]), (1, ALL[1]), (2, ALL[2]), (3, ALL[3])]),
        (("base:",), []),
        (("qemu:",), []),
        (("qemu:dirty-bitmap:",), []),
        ((), []),
        (("unknown:thing", "base:allocation", "qemu:nope"), [(0, ALL[0])]),
    ],
    ids=[
        "base",
        "depth",
        "bitmap",
        "two-bitmaps",
        "everything",
        "base-prefix-selects-nothing",
        "qemu-prefix-selects-nothing",
        "bitmap-prefix-selects-nothing",
        "no-query",
        "unknown-skipped",
    ],
)
def test_set_meta_context_selects_exact_names_with_qemu_ids(
    queries: tuple[str, ...], expected: list[tuple[int, str]]
) -> None:
    conn = structured_start()
    out = feed(
        conn,
        [
            spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", queries)),
            spec.option(spec.OPT_GO, spec.info_data("disk")),
        ],
    )
    rs = spec.parse_option_replies(out.output)
    set_part = b"".join(
        spec.option_reply(r.option, r.type, r.payload)
        for r in rs
        if r.option == spec.OPT_SET_META_CONTEXT
    )
    assert meta_replies(spec.OPT_SET_META_CONTEXT, set_part) == expected
    (event,) = out.events
    assert isinstance(event, Negotiated)
    assert event.contexts == tuple(MetaContext(i, n) for i, n in expected)


def test_bitmap_ids_start_at_two_without_allocation_depth() -> None:
    export = FakeExport("vm/disk", "", 4096, ("qemu:dirty-bitmap:c1", "base:allocation"))
    conn = structured_start(FakeCatalog(export))
    data = spec.meta_data("vm/disk", ("qemu:dirty-bitmap:c1", "base:allocation"))
    out = feed(conn, [spec.option(spec.OPT_SET_META_CONTEXT, data)])
    assert meta_replies(spec.OPT_SET_META_CONTEXT, out.output) == [
        (0, "base:allocation"),
        (2, "qemu:dirty-bitmap:c1"),
    ]


@pytest.mark.parametrize("opt", [spec.OPT_SET_META_CONTEXT, spec.OPT_LIST_META_CONTEXT])
def test_meta_context_before_structured_reply_is_err_invalid(opt: int) -> None:
    conn = start()
    out = feed(conn, [spec.option(opt, spec.meta_data("disk", ("base:allocation",)))])
    assert replies(out.output) == [(opt, spec.REP_ERR_INVALID)]


def test_failed_set_before_structured_reply_selects_nothing() -> None:
    conn = start()
    out = feed(
        conn,
        [
            spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",))),
            spec.option(spec.OPT_STRUCTURED_REPLY),
            spec.option(spec.OPT_GO, spec.info_data("disk")),
        ],
    )
    assert out.events == [Negotiated(DISK, (), True, False)]


@pytest.mark.parametrize("opt", [spec.OPT_SET_META_CONTEXT, spec.OPT_LIST_META_CONTEXT])
def test_meta_context_for_an_unknown_export_is_err_unknown(opt: int) -> None:
    conn = structured_start()
    out = feed(conn, [spec.option(opt, spec.meta_data("nosuch", ("base:allocation",)))])
    assert replies(out.output) == [(opt, spec.REP_ERR_UNKNOWN)]


@pytest.mark.parametrize("opt", [spec.OPT_SET_META_CONTEXT, spec.OPT_LIST_META_CONTEXT])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        spec.u32(5) + b"disk",  # export name overruns
        spec.u32(4) + b"disk",  # no query count
        spec.u32(4) + b"disk" + spec.u32(1),  # one query promised, none sent
        spec.u32(4) + b"disk" + spec.u32(1) + spec.u32(20) + b"base:allocation",  # query overruns
        spec.meta_data("disk", ("base:allocation",)) + b"x",  # trailing data
        spec.u32(2) + b"\xff\xfe" + spec.u32(0),  # export name not UTF-8
    ],
    ids=[
        "empty",
        "short",
        "name-overruns",
        "no-count",
        "missing-query",
        "query-overruns",
        "trailing",
        "bad-utf8",
    ],
)
def test_meta_context_with_malformed_data_is_err_invalid(opt: int, data: bytes) -> None:
    conn = structured_start()
    out = feed(conn, [spec.option(opt, data)])
    assert replies(out.output) == [(opt, spec.REP_ERR_INVALID)]
    assert go_works(conn)


def test_meta_context_query_that_is_not_utf8_is_skipped() -> None:
    conn = structured_start()
    data = spec.u32(4) + b"disk" + spec.u32(2) + spec.u32(2) + b"\xff\xfe"
    data += spec.u32(15) + b"base:allocation"
    out = feed(conn, [spec.option(spec.OPT_SET_META_CONTEXT, data)])
    assert meta_replies(spec.OPT_SET_META_CONTEXT, out.output) == [(0, "base:allocation")]


@pytest.mark.parametrize(
    ("set_on", "go_to", "kept"),
    [("disk", "disk", True), ("disk", "plain", False), ("plain", "disk", False)],
)
def test_contexts_are_forgotten_when_go_names_another_export(
    set_on: str, go_to: str, kept: bool
) -> None:
    conn = structured_start()
    out = feed(
        conn,
        [
            spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data(set_on, ("base:allocation",))),
            spec.option(spec.OPT_GO, spec.info_data(go_to)),
        ],
    )
    expected = (MetaContext(0, "base:allocation"),) if kept else ()
    export = DISK if go_to == "disk" else PLAIN
    assert out.events == [Negotiated(export, expected, True, False)]


def test_contexts_are_forgotten_when_export_name_names_another_export() -> None:
    conn = structured_start()
    out = feed(
        conn,
        [
            spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",))),
            spec.option(spec.OPT_EXPORT_NAME, b"plain"),
        ],
    )
    assert out.events == [Negotiated(PLAIN, (), True, False)]


@pytest.mark.parametrize(
    "second",
    [
        spec.meta_data("nosuch", ("base:allocation",)),
        spec.meta_data("disk", ("qemu:dirty-bitmap:b0",)),
        b"garbage",
    ],
    ids=["failed-unknown-export", "other-selection", "failed-malformed"],
)
def test_set_meta_context_replaces_the_previous_selection(second: bytes) -> None:
    conn = structured_start()
    out = feed(
        conn,
        [
            spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",))),
            spec.option(spec.OPT_SET_META_CONTEXT, second),
            spec.option(spec.OPT_GO, spec.info_data("disk")),
        ],
    )
    (event,) = out.events
    assert isinstance(event, Negotiated)
    assert MetaContext(0, "base:allocation") not in event.contexts


def test_list_meta_context_does_not_change_the_selection() -> None:
    conn = structured_start()
    out = feed(
        conn,
        [
            spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data("disk", ("base:allocation",))),
            spec.option(spec.OPT_LIST_META_CONTEXT, spec.meta_data("plain")),
            spec.option(spec.OPT_GO, spec.info_data("disk")),
        ],
    )
    assert out.events == [Negotiated(DISK, (MetaContext(0, "base:allocation"),), True, False)]
