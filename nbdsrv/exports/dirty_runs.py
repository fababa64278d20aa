"""A frozen dirty bitmap as its runs, with the block-status descriptors packed once.

A session's bitmaps never change, so their clean/dirty runs are found once (the set bits of
``bits ^ (bits >> 1)`` are where runs start) and every descriptor of the whole disk is packed
in wire form then. A block-status request is a bisect for its
first descriptor, a slice up to the limit, and the first and last descriptor re-packed,
clipped to the request; REQ_ONE is one bisect and one unpack (the server packs the whole
reply around it at once: ``DescriptorTable`` is its ``StatusSource``). No per-run Python object.

    starts   |0        |96K   |192K              |...        (where descriptor k starts)
    packed   |(96K,0)  |(96K,1)|(…,0)            |...        (length, flags) big-endian
    request [100K, 250K) → descriptors 1..2, clipped: [(92K, 1), (58K, 0)]

Memory: the bitarray (one bit per block) until the first client negotiates the context,
then 8 bytes per run start (4 below 2^32 blocks) plus 8 per compact or 16 per extended
descriptor (each packed on first use).
"""

import operator
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right

from ..proto.constants import DIRTY
from ..proto.extents import Extent, PackedExtents
from .dirty_bitmap import DirtyBitmap

# Longest compact descriptor (32-bit length), a multiple of every granularity up to 2 GiB.
COMPACT_CAP = 1 << 31
_COMPACT = struct.Struct(">II")
_EXTENDED = struct.Struct(">QQ")


class DescriptorTable:
    """One descriptor list: where each starts, in blocks (for bisect), and all of them packed.
    A ``proto.extents.StatusSource``: the server answers block status with it directly."""

    def __init__(
        self, starts: "array[int]", packed: bytes, item: struct.Struct, size: int, grain: int
    ) -> None:
        self.starts = starts
        self.packed = packed
        self.item = item
        self.size = size
        self.grain = grain

    def nbytes(self) -> int:
        return self.starts.itemsize * len(self.starts) + len(self.packed)

    def _end(self, k: int) -> int:
        """Byte offset where descriptor ``k`` ends."""
        starts = self.starts
        return starts[k + 1] * self.grain if k + 1 < len(starts) else self.size

    def first(self, offset: int, end: int) -> tuple[int, int]:
        """The descriptor at ``offset``, clipped to ``[offset, end)``: a REQ_ONE answer.
        ``offset < end <= size``."""
        starts, grain = self.starts, self.grain
        k = bisect_right(starts, offset // grain) - 1
        nxt = k + 1
        stop = starts[nxt] * grain if nxt < len(starts) else self.size
        _, flags = self.item.unpack_from(self.packed, k * self.item.size)
        return (stop if stop < end else end) - offset, flags

    def descriptors(self, offset: int, end: int, limit: int) -> tuple[bytes | bytearray, int]:
        """At most ``limit`` descriptors of ``[offset, end)``, clipped to it, and how many.
        ``offset < end <= size``."""
        starts, item, grain = self.starts, self.item, self.grain
        first = bisect_right(starts, offset // grain) - 1
        stop = min(bisect_left(starts, -(-end // grain), first + 1), first + limit)
        w = item.size
        if stop == first + 1:  # one descriptor (every REQ_ONE request)
            return item.pack(*self.first(offset, end)), 1
        out = bytearray(memoryview(self.packed)[first * w : stop * w])
        item.pack_into(out, 0, self._end(first) - offset, item.unpack_from(out, 0)[1])
        last = stop - 1
        if self._end(last) > end:
            at = (last - first) * w
            item.pack_into(out, at, end - starts[last] * grain, item.unpack_from(out, at)[1])
        return out, stop - first


class DirtyRuns:
    """The clean/dirty runs of a frozen bitmap, answered as packed descriptors. Found when
    a client first negotiates the context or asks for it (a session may offer contexts
    nobody reads); until then the bitarray is kept, after that dropped."""

    def __init__(self, bitmap: DirtyBitmap) -> None:
        self.size = bitmap.size
        self.grain = bitmap.granularity
        self.dirty_bytes = bitmap.dirty_bytes  # as QMP counts them (session progress)
        self._bitmap: DirtyBitmap | None = bitmap
        self._runs: array[int] = array("Q")
        self._first_dirty = False
        # Packed on first use: [compact, extended], indexed by ``extended``.
        self._tables: list[DescriptorTable | None] = [None, None]

    def _find_runs(self) -> None:
        bitmap, self._bitmap = self._bitmap, None
        assert bitmap is not None
        bits = bitmap.bits
        self._first_dirty = bool(bits[0])
        # Where the value changes: bit i differs from bit i - 1; a run always starts at 0.
        changes = bits ^ (bits >> 1)
        changes[0] = 1
        # Block numbers: 4 bytes each below 2^32 blocks (256 TiB at 64 KiB).
        self._runs = array("I" if len(bits) < 1 << 32 else "Q", changes.search(1))

    @property
    def runs(self) -> int:
        if self._bitmap is not None:
            self._find_runs()
        return len(self._runs)

    def nbytes(self) -> int:
        """Memory held: the bitarray until the runs are found, then the runs' arrays."""
        if self._bitmap is not None:
            return len(self._bitmap.bits) // 8
        total = self._runs.itemsize * len(self._runs)
        for table in self._tables:
            if table is not None:
                total += table.nbytes() if table.starts is not self._runs else len(table.packed)
        return total

    def _build(self, cap: int | None, item: struct.Struct) -> DescriptorTable:
        if self._bitmap is not None:
            self._find_runs()
        runs, grain = self._runs, self.grain
        n = len(runs)
        # C-level map and slice work only, no Python code per run.
        lengths = list(map(grain.__mul__, map(operator.sub, runs[1:], runs)))
        lengths.append(self.size - runs[-1] * grain)
        first, other = (DIRTY, 0) if self._first_dirty else (0, DIRTY)
        flags = [first, other] * (n // 2) + [first] * (n % 2)
        starts = runs
        if cap is not None and max(lengths) > cap:
            starts, split_lengths, split_flags = array(runs.typecode), [], []
            for a, length, flag in zip(runs, lengths, flags, strict=True):
                block = a
                while length > 0:
                    step = min(length, cap)
                    starts.append(block)
                    split_lengths.append(step)
                    split_flags.append(flag)
                    block += step // grain
                    length -= step
            lengths, flags = split_lengths, split_flags
        flat = [0] * (2 * len(lengths))
        flat[0::2] = lengths
        flat[1::2] = flags
        values = array("I" if item is _COMPACT else "Q", flat)
        if sys.byteorder == "little":
            values.byteswap()  # to big-endian
        return DescriptorTable(starts, values.tobytes(), item, self.size, grain)

    def table(self, *, extended: bool) -> DescriptorTable:
        """Every descriptor of the disk, compact (capped at 2 GiB) or extended; packed on the
        first call for each kind."""
        table = self._tables[extended]
        if table is None:
            table = self._build(None, _EXTENDED) if extended else self._build(COMPACT_CAP, _COMPACT)
            self._tables[extended] = table
        return table

    def packed(self, offset: int, length: int, limit: int, *, extended: bool) -> PackedExtents:
        """Descriptors for ``[offset, offset + length)`` (clipped to the disk), at most
        ``limit``, merged already (neighbouring runs always differ)."""
        end = min(offset + length, self.size)
        data, count = self.table(extended=extended).descriptors(offset, end, limit)
        return PackedExtents(data, count, extended)

    def extents(self, offset: int, length: int, limit: int) -> list[Extent]:
        """The same as a list of ``(length, flags)``."""
        p = self.packed(offset, length, limit, extended=True)
        return [(n, f) for n, f in _EXTENDED.iter_unpack(p.data)]
