"""ReadCoverage counts distinct bytes read, whatever the order and overlap of the reads,
before and after its notes are merged in batches."""

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdsrv.exports.coverage import BATCH, ReadCoverage

reads = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=60)


def distinct(ranges: list[tuple[int, int]]) -> int:
    return len({b for offset, length in ranges for b in range(offset, offset + length)})


@given(reads)
def test_bytes_is_the_size_of_the_union(ranges: list[tuple[int, int]]) -> None:
    coverage = ReadCoverage()
    for offset, length in ranges:
        coverage.add(offset, length)
    assert coverage.bytes == distinct(ranges)


@given(reads, reads)
@settings(max_examples=50)
def test_asking_between_reads_changes_nothing(
    first: list[tuple[int, int]], second: list[tuple[int, int]]
) -> None:
    coverage = ReadCoverage()
    for offset, length in first:
        coverage.add(offset, length)
    assert coverage.bytes == distinct(first)
    for offset, length in second:
        coverage.add(offset, length)
    assert coverage.bytes == distinct(first + second)


def test_many_reads_in_order_and_again_backwards() -> None:
    coverage = ReadCoverage()
    count = 3 * BATCH + 7  # several batches merged on the way
    for i in range(count):
        coverage.add(i * 4096, 4096)
    assert coverage.bytes == count * 4096
    for i in reversed(range(count + 10)):
        coverage.add(i * 4096 + 100, 4096)  # overlaps all, adds 10 blocks and 100 bytes
    assert coverage.bytes == (count + 10) * 4096 + 100
