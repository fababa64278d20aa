"""Property tests: garbage at any phase gives clean output or a ProtocolError, nothing else;
buffered input stays bounded; extents and meta-context selection keep their promises."""

import itertools
from collections.abc import Callable

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nbdsrv.proto.constants import MAX_READ_LENGTH, Command, Errno
from nbdsrv.proto.contexts import numbered_contexts, select_contexts
from nbdsrv.proto.errors import ProtocolError
from nbdsrv.proto.extents import normalize_extents
from nbdsrv.proto.server import (
    MAX_OPTION_LENGTH,
    Disconnect,
    Negotiated,
    Phase,
    Request,
    ServerConnection,
)

from . import spec
from .driver import DISK_SIZE, make_catalog, negotiate, start

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SETUPS: dict[str, Callable[[], ServerConnection]] = {
    "after-greeting": lambda: _fresh(),
    "options": lambda: start(),
    "options-structured": lambda: _structured_options(),
    "transmission-simple": lambda: negotiate(structured=False),
    "transmission-structured": lambda: negotiate(queries=("base:allocation", "qemu:")),
    "transmission-extended": lambda: negotiate(
        extended=True, queries=("base:allocation", "qemu:dirty-bitmap:b0")
    ),
    "transmission-no-contexts": lambda: negotiate(queries=()),
}


def _fresh() -> ServerConnection:
    conn = ServerConnection(make_catalog())
    conn.data_to_send()
    return conn


def _structured_options() -> ServerConnection:
    conn = start()
    conn.receive(spec.option(spec.OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    return conn


# Interesting numbers make hypothesis reach the checks, not just the magic test.
NUMBERS = st.one_of(
    st.sampled_from(
        [0, 1, 511, 512, 4096, DISK_SIZE - 1, DISK_SIZE, DISK_SIZE + 1, MAX_READ_LENGTH + 1]
    ),
    st.sampled_from([0xFFFFFFFF, (1 << 63), (1 << 64) - 1]),
    st.integers(0, 1 << 21),
)
NAMES = st.sampled_from(["disk", "plain", "", "nosuch", "base:allocation", "qemu:"])


@st.composite
def options(draw: st.DrawFn) -> bytes:
    opt = draw(st.one_of(st.integers(0, 12), st.integers(0, 0xFFFFFFFF)))
    data = draw(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                spec.info_data,
                NAMES,
                st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple),
            ),
            st.builds(spec.meta_data, NAMES, st.lists(NAMES, max_size=4).map(tuple)),
        )
    )
    return spec.option(opt, data)


@st.composite
def requests(draw: st.DrawFn, extended: bool) -> bytes:
    # Mostly plausible requests, so that the checks past the header are reached too.
    cmd = draw(st.sampled_from([0, 0, 0, 7, 7, 5, 3]) | st.integers(0, 9) | st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0, 0, 0, 8, 4, 1]) | st.integers(0, 0xFFFF))
    offset = draw(st.integers(0, 8192) | NUMBERS)
    length = draw(st.integers(0, 8192) | NUMBERS)
    if not extended:
        length &= 0xFFFFFFFF
        if cmd == spec.CMD_WRITE:
            length %= 64  # a long WRITE payload would only be drained
    elif flags & spec.FLAG_PAYLOAD_LEN:
        length %= 64
    has_payload = (cmd == spec.CMD_WRITE) if not extended else bool(flags & spec.FLAG_PAYLOAD_LEN)
    payload = draw(st.binary(min_size=length, max_size=length)) if has_payload else b""
    make = spec.ext_request if extended else spec.request
    return make(cmd, draw(st.integers(0, (1 << 64) - 1)), offset, length, flags, payload)


def chunks_for(setup: str) -> st.SearchStrategy[list[bytes]]:
    """Mostly well-framed messages of the setup's phase, now and then garbage, the wrong
    header format or the other phase's messages."""
    if setup.startswith("transmission"):
        extended = setup.endswith("extended")
        right, wrong = requests(extended), st.one_of(requests(not extended), options())
    else:
        right, wrong = options(), st.one_of(st.just(spec.u32(3)), requests(False))
    # one_of weighs its branches evenly and folds duplicates, so pick the branch by number.
    branches = [right] * 14 + [wrong, st.binary(max_size=80)]
    message = st.integers(0, len(branches) - 1).flatmap(lambda i: branches[i])
    return st.lists(message, max_size=12)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    setup = draw(st.sampled_from(list(SETUPS)))
    return setup, draw(chunks_for(setup))


def bound(conn: ServerConnection) -> int:
    """Most bytes the core may keep buffered between calls in its phase."""
    if conn.phase is Phase.CLIENT_FLAGS:
        return 3
    if conn.phase is Phase.OPTIONS:
        return 16 + MAX_OPTION_LENGTH
    return 31  # at most one incomplete (extended) request header


def check_output(before: Phase, conn: ServerConnection, output: bytes) -> None:
    """Output of a call that stayed in one phase must be well framed."""
    if before is not conn.phase:
        return
    if before is Phase.OPTIONS:
        for reply in spec.parse_option_replies(output):
            assert reply.type == spec.REP_ACK or reply.type & 0x80000000 or reply.type in (2, 3, 4)
    elif before is Phase.TRANSMISSION:
        for reply in spec.parse_replies(output):
            assert reply.kind == ("ext" if conn.extended else reply.kind)
            if reply.kind == "simple":
                assert reply.error in {0, *map(int, Errno)}
            elif reply.type == spec.TYPE_ERROR:
                assert spec.parse_error_chunk(reply.payload)[0] in set(map(int, Errno)) - {0}
            else:
                assert (reply.type, reply.flags, reply.payload) == (spec.TYPE_NONE, 1, b"")


def check_servable(conn: ServerConnection, request: Request) -> None:
    """Every request handed out can be answered by the reply builders."""
    assert conn.export is not None
    assert request.command in (Command.READ, Command.CACHE, Command.BLOCK_STATUS)
    assert request.offset + request.length <= conn.export.size
    if request.command == Command.READ:
        assert request.length <= MAX_READ_LENGTH
        conn.read_reply(request, [(request.offset, request.length, None)])
    elif request.command == Command.BLOCK_STATUS:
        assert conn.contexts and request.length > 0
        conn.block_status_reply(request, [(c.id, [(request.length, 3)]) for c in conn.contexts])
    else:
        conn.ok_reply(request)


@FUZZ
@given(conversation=conversations())
def test_garbage_gives_clean_output_or_a_protocol_error(
    conversation: tuple[str, list[bytes]],
) -> None:
    setup, chunks = conversation
    conn = SETUPS[setup]()
    for data in chunks:
        before = conn.phase
        try:
            events = conn.receive(data)
        except ProtocolError:
            return
        check_output(before, conn, conn.data_to_send())
        for event in events:
            assert isinstance(event, Negotiated | Request | Disconnect)
            if isinstance(event, Request):
                check_servable(conn, event)
        if conn.phase is not Phase.CLOSED:
            assert len(conn._buf) <= bound(conn)  # the only view of the core's buffer


@FUZZ
@given(setup=st.sampled_from(list(SETUPS)), data=st.binary(min_size=1, max_size=2000))
def test_raw_bytes_fed_one_at_a_time_never_raise_anything_but_protocol_error(
    setup: str, data: bytes
) -> None:
    conn = SETUPS[setup]()
    try:
        for i in range(len(data)):
            conn.receive(data[i : i + 1])
            assert conn.phase is Phase.CLOSED or len(conn._buf) <= bound(conn)
    except ProtocolError:
        pass


def test_buffer_after_close_does_not_grow() -> None:
    conn = negotiate()
    conn.receive(spec.request(spec.CMD_DISC, 1, 0, 0))
    held = len(conn._buf)
    for _ in range(100):
        assert conn.receive(b"x" * 1000) == []
    assert len(conn._buf) == held


# -- normalize_extents -----------------------------------------------------------------------

EXTENTS = st.lists(st.tuples(st.integers(-2, 60), st.integers(0, 3)), max_size=40)


def expand(extents: list[tuple[int, int]]) -> list[int]:
    """One flags value per byte."""
    return [f for n, f in extents if n > 0 for _ in range(n)]


@settings(max_examples=500)
@given(
    extents=EXTENTS,
    length=st.integers(0, 600),
    limit=st.integers(1, 12),
    max_extent=st.integers(1, 25),
)
def test_normalize_extents_properties(
    extents: list[tuple[int, int]], length: int, limit: int, max_extent: int
) -> None:
    out = normalize_extents(extents, length, limit=limit, max_extent=max_extent)
    covered = sum(n for n, _ in out)
    assert covered <= length
    assert len(out) <= limit
    assert all(0 < n <= max_extent for n, _ in out)
    # Neighbours differ, unless the first was cut at the cap.
    assert all(a[1] != b[1] or a[0] == max_extent for a, b in itertools.pairwise(out))
    # The bytes described are a prefix of the source's bytes.
    source = expand(extents)
    assert expand(out) == source[:covered]
    # Only the extent limit may stop it short of the request or the source.
    if len(out) < limit:
        assert covered == min(length, len(source))
    if length > 0 and source:
        assert out


@given(extents=EXTENTS, length=st.integers(1, 600))
def test_normalize_extents_with_limit_one_gives_one_extent_within_the_request(
    extents: list[tuple[int, int]], length: int
) -> None:
    assume(any(n > 0 for n, _ in extents))
    out = normalize_extents(extents, length, limit=1, max_extent=0xFFFFFFFF)
    assert len(out) == 1 and out[0][0] <= length


def test_normalize_extents_merges_across_the_source_boundaries() -> None:
    source = [(1, 0)] * 10 + [(5, 1)]
    assert normalize_extents(source, 100, limit=10, max_extent=100) == [(10, 0), (5, 1)]


# -- select_contexts -------------------------------------------------------------------------

POOL = [
    "base:allocation",
    "qemu:allocation-depth",
    "qemu:dirty-bitmap:a",
    "qemu:dirty-bitmap:b",
    "qemu:dirty-bitmap:c",
]
PREFIXES = ["base:", "qemu:", "qemu:dirty-bitmap:"]
JUNK = ["", ":", "base:nope", "qemu:dirty-bitmap:zz", "nbd-server:x", "qemu", "BASE:allocation"]
OFFERED = st.lists(st.sampled_from(POOL), unique=True).flatmap(st.permutations)
QUERIES = st.lists(st.sampled_from(POOL + PREFIXES + JUNK), max_size=8)


def prefix_match(query: str, name: str) -> bool:
    if query == "base:":
        return name == "base:allocation"
    return query in ("qemu:", "qemu:dirty-bitmap:") and name.startswith(query)


@given(offered=OFFERED, queries=QUERIES, listing=st.booleans())
def test_select_contexts_properties(offered: list[str], queries: list[str], listing: bool) -> None:
    chosen = select_contexts(offered, queries, listing=listing)
    ids = [c.id for c in chosen]
    assert ids == sorted(set(ids))  # id order, each once
    assert {c.name for c in chosen} <= set(offered)
    names = {c.name for c in chosen}
    if not listing:
        assert names == set(queries) & set(offered)  # exact names only
    elif not queries:
        assert names == set(offered)
    else:
        expected = {n for n in offered if n in queries or any(prefix_match(q, n) for q in queries)}
        assert names == expected


@given(offered=OFFERED)
def test_context_ids_follow_qemu(offered: list[str]) -> None:
    numbered = {c.name: c.id for c in numbered_contexts(offered)}
    assert numbered.get("base:allocation", 0) == 0
    assert numbered.get("qemu:allocation-depth", 1) == 1
    bitmaps = [numbered[n] for n in offered if n.startswith("qemu:dirty-bitmap:")]
    assert bitmaps == list(range(2, 2 + len(bitmaps)))  # 2, 3, ... in the order offered


@given(offered=OFFERED, queries=QUERIES, extra=QUERIES, listing=st.booleans())
def test_more_queries_never_select_fewer_contexts(
    offered: list[str], queries: list[str], extra: list[str], listing: bool
) -> None:
    assume(queries or not listing)  # an empty LIST already means everything
    few = select_contexts(offered, queries, listing=listing)
    more = select_contexts(offered, queries + extra, listing=listing)
    assert set(few) <= set(more)
