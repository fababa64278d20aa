"""nbdsrv.exports.dirty_bitmap against a byte-per-block model."""

from hypothesis import given
from hypothesis import strategies as st

from nbdsrv.exports.dirty_bitmap import DirtyBitmap

K = 1024


def test_extents_start_mid_block_and_alternate() -> None:
    bitmap = DirtyBitmap(256 * K, 64 * K)
    bitmap.mark(64 * K, 128 * K)
    assert bitmap.extents(70 * K, 150 * K, limit=100) == [(122 * K, 1), (28 * K, 0)]


def test_dirty_bytes_clips_partial_last_block() -> None:
    bitmap = DirtyBitmap(100 * K, 64 * K)
    bitmap.mark(99 * K, 1)
    assert bitmap.dirty_bytes == 36 * K


def test_from_extents_marks_every_touched_block() -> None:
    bitmap = DirtyBitmap.from_extents(256 * K, 64 * K, [(0, 1, 1), (1, 200 * K, 0)])
    assert bitmap.bits.tolist() == [1, 0, 0, 0]


@given(
    size=st.integers(1, 64 * K),
    writes=st.lists(st.tuples(st.integers(0, 64 * K), st.integers(1, 8 * K)), max_size=20),
    query=st.tuples(st.integers(0, 64 * K), st.integers(1, 64 * K)),
    limit=st.integers(1, 50),
)
def test_extents_match_block_model(
    size: int, writes: list[tuple[int, int]], query: tuple[int, int], limit: int
) -> None:
    granularity = 512
    bitmap = DirtyBitmap(size, granularity)
    model = [0] * ((size + granularity - 1) // granularity)
    for offset, length in writes:
        if offset >= size:
            continue
        bitmap.mark(offset, length)
        for block in range(
            offset // granularity, (min(offset + length, size) - 1) // granularity + 1
        ):
            model[block] = 1
    offset, length = query
    if offset >= size:
        return
    extents = bitmap.extents(offset, length, limit)
    assert 0 < len(extents) <= limit
    pos = offset
    for i, (n, flags) in enumerate(extents):
        assert n > 0
        if i:
            assert flags != extents[i - 1][1]
        for byte in (pos, pos + n - 1):
            assert model[byte // granularity] == flags
        pos += n
    assert pos <= min(offset + length, size)
    if len(extents) < limit:
        assert pos == min(offset + length, size)
