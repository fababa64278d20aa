"""Dirty bitmaps in memory (bitarray): built from block-status extents, OR-merged along a
checkpoint chain, answered as extents without a round trip to QEMU.

One bit per ``granularity`` bytes; the last bit may cover a partial block::

    bytes   |0 ........ 64K|64K ...... 128K|128K ..... 192K|192K .. size|
    bits    |      0       |       1       |       1       |     0      |
    extents(70K, 150K) → [(122K, DIRTY), (28K, CLEAN)]   (first run starts mid-block)
"""

from collections.abc import Iterable

from bitarray import bitarray

from ..proto.constants import DIRTY
from ..proto.extents import Extent

CLEAN = 0


class DirtyBitmap:
    """Which ``granularity``-sized blocks of a ``size``-byte disk are dirty."""

    def __init__(self, size: int, granularity: int, bits: bitarray | None = None) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two")
        self.size = size
        self.granularity = granularity
        nbits = (size + granularity - 1) // granularity
        if bits is None:
            bits = bitarray(nbits)
            bits.setall(0)
        elif len(bits) != nbits:
            raise ValueError(f"{len(bits)} bits for {nbits} blocks")
        self.bits = bits

    @classmethod
    def from_extents(
        cls, size: int, granularity: int, extents: Iterable[tuple[int, int, int]]
    ) -> "DirtyBitmap":
        """From ``(offset, length, flags)`` extents; a block touched by a dirty extent is dirty."""
        bitmap = cls(size, granularity)
        for offset, length, flags in extents:
            if flags & DIRTY and length > 0:
                bitmap.mark(offset, length)
        return bitmap

    def mark(self, offset: int, length: int) -> None:
        first = offset // self.granularity
        last = (min(offset + length, self.size) - 1) // self.granularity
        self.bits[first : last + 1] = 1

    def __or__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        if (self.size, self.granularity) != (other.size, other.granularity):
            raise ValueError("bitmaps of different size or granularity")
        return DirtyBitmap(self.size, self.granularity, self.bits | other.bits)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return (self.size, self.granularity, self.bits) == (
            other.size,
            other.granularity,
            other.bits,
        )

    def __hash__(self) -> int:
        raise TypeError("DirtyBitmap is mutable")

    @property
    def qemu_count(self) -> int:
        """What QMP's ``count`` reports for these bits: QEMU counts whole granules, even the
        last one that runs past the end of the disk."""
        return int(self.bits.count(1)) * self.granularity

    @property
    def dirty_bytes(self) -> int:
        """Dirty bytes of the disk (whole blocks, the last one clipped at the disk's end)."""
        total = self.bits.count(1) * self.granularity
        last = len(self.bits) - 1
        if last >= 0 and self.bits[last]:
            total -= len(self.bits) * self.granularity - self.size
        return total

    def extents(self, offset: int, length: int, limit: int) -> list[Extent]:
        """Alternating clean/dirty runs from ``offset``, covering at most ``length`` bytes and
        at most ``limit`` runs."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        end_bit = (end - 1) // self.granularity + 1 if end > offset else 0
        while pos < end and len(out) < limit:
            bit = pos // self.granularity
            value = self.bits[bit]
            other = self.bits.find(not value, bit + 1, end_bit)
            run_end = end if other < 0 else min(other * self.granularity, end)
            out.append((run_end - pos, DIRTY if value else CLEAN))
            pos = run_end
        return out
