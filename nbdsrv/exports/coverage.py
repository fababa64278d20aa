"""Which bytes of an export have been read at least once: sorted, disjoint, merged ranges.

Backup clients read mostly in order, so the set stays a handful of ranges. Every read served
is only noted; notes are merged in batches (sorted, neighbours joined, then each resulting
range inserted by bisect), so the cost per read is an append::

    ranges  [0,4M) [8M,9M)    notes 4M+1M 5M+3M  →  [4M,8M)  →  ranges [0,9M)
"""

import bisect

# Notes kept before they are merged: bounds the memory of a long session.
BATCH = 1024


class ReadCoverage:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._bytes = 0
        self._notes: list[tuple[int, int]] = []  # (start, end) not merged yet

    def add(self, offset: int, length: int) -> None:
        if length > 0:
            notes = self._notes
            notes.append((offset, offset + length))
            if len(notes) >= BATCH:
                self._merge()

    @property
    def bytes(self) -> int:
        """Distinct bytes covered."""
        self._merge()
        return self._bytes

    def _merge(self) -> None:
        notes, self._notes = self._notes, []
        if not notes:
            return
        notes.sort()
        start, end = notes[0]
        for note_start, note_end in notes:
            if note_start <= end:
                end = max(end, note_end)
            else:
                self._insert(start, end)
                start, end = note_start, note_end
        self._insert(start, end)

    def _insert(self, start: int, end: int) -> None:
        # Ranges that touch or overlap [start, end) are merged into one.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
            for i in range(first, last):
                self._bytes -= self._ends[i] - self._starts[i]
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]
        self._bytes += end - start
