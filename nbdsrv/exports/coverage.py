"""Which bytes of an export have been read at least once: sorted, disjoint, merged ranges.

Backup clients read mostly in order, so the set stays a handful of ranges; an insert is a
bisect and a merge with its neighbours::

    ranges  [0,4M) [8M,9M)        add(4M, 4M)  →  [0,9M)
"""

import bisect


class ReadCoverage:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.bytes = 0
        """Distinct bytes covered."""

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        start, end = offset, offset + length
        # Ranges that touch or overlap [start, end) are merged into one.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
            for i in range(first, last):
                self.bytes -= self._ends[i] - self._starts[i]
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]
        self.bytes += end - start
