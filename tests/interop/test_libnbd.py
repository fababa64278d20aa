"""libnbd's Python API (run in nbdsh) against a real nbdsrv daemon."""

import hashlib
import random

import pytest

from tests.harness.images import KiB, MiB
from tests.harness.served import Served
from tests.interop.nbdsh import nbdsh

HOLE_ZERO = 3

BLOCK_STATUS = """
h.add_meta_context("base:allocation")
h.connect_uri(uri)
extents = []


def collect(metacontext, offset, entries, err):
    extents.append([metacontext, list(entries)])
    return 0


h.block_status(count, offset, collect, flags=nbd.CMD_FLAG_REQ_ONE if req_one else 0)
out["extents"] = extents
"""


def block_status(uri: str, offset: int, count: int, *, req_one: bool) -> list[tuple[int, int]]:
    """The (length, flags) pairs of one base:allocation block status reply."""
    result = nbdsh(BLOCK_STATUS, uri=uri, offset=offset, count=count, req_one=req_one)
    assert [context for context, _ in result["extents"]] == ["base:allocation"]
    entries: list[int] = result["extents"][0][1]
    return list(zip(entries[0::2], entries[1::2], strict=True))


@pytest.mark.parametrize(
    ("offset", "count", "expected"),
    [
        (0, 8 * MiB, (64 * KiB, 0)),  # first data run, not the whole export
        (0, 4 * KiB, (4 * KiB, 0)),  # clipped to the count asked
        (64 * KiB, 8 * MiB - 64 * KiB, (1 * MiB - 64 * KiB, HOLE_ZERO)),  # a whole hole
        (1 * MiB + 512, 7 * MiB - 512, (128 * KiB - 512, 0)),  # from inside a data run
        (8 * MiB - 4 * KiB, 4 * KiB, (4 * KiB, 0)),  # the last run, up to the end
    ],
    ids=["data", "clipped", "hole", "inside-run", "tail"],
)
def test_req_one_block_status_returns_exactly_one_extent(
    nbdsrv: Served, offset: int, count: int, expected: tuple[int, int]
) -> None:
    assert block_status(nbdsrv.tcp_uri("sparse"), offset, count, req_one=True) == [expected]


def test_block_status_without_req_one_covers_the_layout(nbdsrv: Served) -> None:
    image = nbdsrv.images["sparse"]
    extents = block_status(nbdsrv.unix_uri("sparse"), 0, image.size, req_one=False)
    expected = [(length, 0 if is_data else HOLE_ZERO) for _, length, is_data in image.layout]
    assert extents == expected


def test_block_status_from_a_hole_reports_the_rest_of_the_layout(nbdsrv: Served) -> None:
    image = nbdsrv.images["sparse"]
    start = 2 * MiB
    extents = block_status(nbdsrv.tcp_uri("sparse"), start, image.size - start, req_one=False)
    expected = [
        (min(offset + length, image.size) - max(offset, start), 0 if is_data else HOLE_ZERO)
        for offset, length, is_data in image.layout
        if offset + length > start
    ]
    assert extents == expected


OUT_OF_RANGE = """
h.set_strict_mode(0)  # let the requests reach the server
h.connect_uri(uri)
out["errors"] = [error_of(h.pread, length, offset) for offset, length in requests]
out["after"] = h.pread(4, 0).hex()  # the connection is still usable
"""


def test_out_of_range_read_gets_einval_and_the_connection_stays_usable(nbdsrv: Served) -> None:
    size = nbdsrv.images["sparse"].size
    requests = [(size - 512, 4096), (size, 1), (size + 4096, 512)]
    result = nbdsh(OUT_OF_RANGE, uri=nbdsrv.tcp_uri("sparse"), requests=requests)
    assert [e and e["errno"] for e in result["errors"]] == ["EINVAL"] * len(requests)
    assert result["after"] == "11111111"


UNKNOWN_EXPORT = """
out["error"] = error_of(h.connect_uri, uri)
"""


def test_unknown_export_fails_to_connect_as_not_present(nbdsrv: Served) -> None:
    result = nbdsh(UNKNOWN_EXPORT, uri=nbdsrv.tcp_uri("nope"))
    # libnbd turns the server's NBD_REP_ERR_UNKNOWN into ENOENT and this message.
    assert result["error"] is not None, "connected to an export that does not exist"
    assert result["error"]["errno"] == "ENOENT"
    assert "no export named 'nope'" in result["error"]["message"]


LIST_CONTEXTS = """
h.set_opt_mode(True)
for query in queries:
    h.add_meta_context(query)
h.connect_uri(uri)
names = []
out["count"] = h.opt_list_meta_context(lambda name: names.append(name))
out["names"] = names
h.opt_abort()
"""


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], ["base:allocation"]),  # no query: every context of the export
        (["qemu:"], []),  # a file export has no qemu: context
        (["base:"], ["base:allocation"]),
        (["base:allocation"], ["base:allocation"]),
        (["nosuch:thing", "base:allocation"], ["base:allocation"]),  # unknown is skipped
        (["qemu:dirty-bitmap:"], []),
    ],
    ids=["no-query", "qemu-prefix", "base-prefix", "exact", "unknown-skipped", "bitmaps"],
)
def test_list_meta_context(nbdsrv: Served, queries: list[str], expected: list[str]) -> None:
    result = nbdsh(LIST_CONTEXTS, uri=nbdsrv.unix_uri("sparse"), queries=queries)
    assert result["names"] == expected
    assert result["count"] == len(expected)


SET_CONTEXTS = """
for query in queries:
    h.add_meta_context(query)
h.connect_uri(uri)
out["can"] = {name: h.can_meta_context(name) for name in queries + ["base:allocation"]}
out["block_status"] = error_of(h.block_status, 4096, 0, lambda *args: 0)
"""


def test_unknown_meta_context_is_not_selected(nbdsrv: Served) -> None:
    result = nbdsh(SET_CONTEXTS, uri=nbdsrv.tcp_uri("sparse"), queries=["nosuch:context"])
    assert result["can"] == {"nosuch:context": False, "base:allocation": False}
    # Nothing was selected, so block status is not allowed on this connection.
    assert result["block_status"] is not None


def test_unknown_meta_context_beside_a_known_one_selects_only_the_known(nbdsrv: Served) -> None:
    queries = ["nosuch:context", "base:allocation", "qemu:allocation-depth"]
    result = nbdsh(SET_CONTEXTS, uri=nbdsrv.tcp_uri("sparse"), queries=queries)
    assert result["can"] == {
        "nosuch:context": False,
        "base:allocation": True,
        "qemu:allocation-depth": False,
    }
    assert result["block_status"] is None


MANY_READS = """
h.connect_uri(uri)
buffers = []
for offset, length in requests:
    buf = nbd.Buffer(length)
    buffers.append((h.aio_pread(buf, offset), buf))
out["in_flight"] = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
out["errors"] = [error_of(h.aio_command_completed, cookie) for cookie, _ in buffers]
out["digests"] = [hashlib.sha256(buf.to_bytearray()).hexdigest() for _, buf in buffers]
"""


def test_hundred_reads_in_flight_all_complete_with_the_right_data(nbdsrv: Served) -> None:
    image = nbdsrv.images["sparse"]
    content = image.content()
    rng = random.Random(100)
    requests = []
    for _ in range(100):
        length = rng.choice([512, 4 * KiB, 64 * KiB, 200 * KiB])
        offset = rng.randrange(0, image.size - length)
        requests.append((offset, length))
    snippet = "import hashlib\n" + MANY_READS
    result = nbdsh(snippet, uri=nbdsrv.unix_uri("sparse"), requests=requests)
    assert result["in_flight"] == 100  # issued before any reply was collected
    assert result["errors"] == [None] * 100
    expected = [hashlib.sha256(content[o : o + n]).hexdigest() for o, n in requests]
    assert result["digests"] == expected


WRITE = """
h.set_strict_mode(0)  # libnbd would refuse the write itself on a read-only export
h.connect_uri(uri)
out["read_only"] = h.is_read_only()
out["pwrite"] = error_of(h.pwrite, b"x" * 512, 0)
out["after"] = h.pread(4, 0).hex()
"""


def test_write_on_the_read_only_export_fails_with_eperm(nbdsrv: Served) -> None:
    result = nbdsh(WRITE, uri=nbdsrv.tcp_uri("sparse"))
    assert result["read_only"] is True
    assert result["pwrite"] is not None, "the write was accepted"
    assert result["pwrite"]["errno"] == "EPERM"
    assert result["after"] == "11111111"


ADVERTISED = """
h.connect_uri(uri)
out["flags"] = {"flush": h.can_flush(), "cache": h.can_cache()}
out["errors"] = {"flush": error_of(h.flush), "cache": error_of(h.cache, 64 * 1024, 0)}
"""


def test_advertised_flush_and_cache_succeed(nbdsrv: Served) -> None:
    result = nbdsh(ADVERTISED, uri=nbdsrv.tcp_uri("sparse"))
    assert result["flags"] == {"flush": True, "cache": True}
    assert result["errors"] == {"flush": None, "cache": None}


WRITE_LIKE = """
h.set_strict_mode(0)
h.connect_uri(uri)
out["errors"] = {
    "trim": error_of(h.trim, 4096, 0),
    "zero": error_of(h.zero, 4096, 0),
}
out["after"] = h.pread(4, 0).hex()
"""


def test_trim_and_write_zeroes_on_the_read_only_export_fail_with_eperm(nbdsrv: Served) -> None:
    result = nbdsh(WRITE_LIKE, uri=nbdsrv.unix_uri("sparse"))
    assert {k: e and e["errno"] for k, e in result["errors"].items()} == {
        "trim": "EPERM",
        "zero": "EPERM",
    }
    assert result["after"] == "11111111"
