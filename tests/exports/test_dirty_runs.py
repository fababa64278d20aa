"""nbdsrv.exports.dirty_runs (packed descriptors of a frozen bitmap) against DirtyBitmap."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdsrv.exports import dirty_runs
from nbdsrv.exports.dirty_bitmap import DirtyBitmap
from nbdsrv.exports.dirty_runs import DirtyRuns
from tests.harness.extents import merged

K = 1024


def unpack(data: bytes, extended: bool) -> list[tuple[int, int]]:
    return list(struct.iter_unpack(">QQ" if extended else ">II", bytes(data)))


def test_clipped_to_the_request() -> None:
    bitmap = DirtyBitmap(256 * K, 64 * K)
    bitmap.mark(64 * K, 128 * K)
    runs = DirtyRuns(bitmap)
    p = runs.packed(70 * K, 150 * K, 100, extended=False)
    assert unpack(p.data, False) == [(122 * K, 1), (28 * K, 0)]
    one = runs.packed(70 * K, 150 * K, 1, extended=True)
    assert (one.count, unpack(one.data, True)) == (1, [(122 * K, 1)])
    assert runs.runs == 3


@settings(max_examples=300, deadline=None)
@given(
    grain_shift=st.integers(0, 3),
    nbits=st.integers(1, 40),
    marks=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 6)), max_size=12),
    start=st.integers(0, 10**6),
    length=st.integers(1, 10**6),
    limit=st.integers(1, 6),
    extended=st.booleans(),
    cap_blocks=st.sampled_from([None, 1, 2, 3]),
)
def test_packed_equals_the_bitmap(
    grain_shift: int,
    nbits: int,
    marks: list[tuple[int, int]],
    start: int,
    length: int,
    limit: int,
    extended: bool,
    cap_blocks: int | None,
) -> None:
    grain = 512 << grain_shift
    size = nbits * grain - (grain // 3 if nbits > 1 else 0)  # a partial last block
    bitmap = DirtyBitmap(size, grain)
    for first, count in marks:
        if first < nbits:
            bitmap.mark(first * grain, count * grain)
    cap = dirty_runs.COMPACT_CAP if cap_blocks is None else cap_blocks * grain
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dirty_runs, "COMPACT_CAP", cap)
        runs = DirtyRuns(bitmap)
        runs.packed(0, size, 1, extended=False)  # descriptors are packed on first use
    offset = start % size
    length = min(length, size - offset)
    truth = merged(bitmap.extents(offset, length, 1 << 30))
    p = runs.packed(offset, length, limit, extended=extended)
    got = unpack(p.data, extended)
    assert p.count == len(got) and 1 <= len(got) <= limit and p.extended == extended
    assert all(n > 0 for n, _ in got)
    if not extended:
        assert all(n <= cap for n, _ in got)
    got_merged = merged(got)
    if sum(n for n, _ in got) == length:
        assert got_merged == truth
    else:  # stopped at the limit: a prefix of the truth
        assert len(got) == limit
        assert got_merged[:-1] == truth[: len(got_merged) - 1]
        n, f = got_merged[-1]
        assert truth[len(got_merged) - 1][1] == f and n <= truth[len(got_merged) - 1][0]
    assert merged(runs.extents(offset, length, 1 << 30)) == truth
