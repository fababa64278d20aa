"""Extent lists: clip to a request, coalesce equal neighbours, cap the count — in one place.

An extent is ``(length, flags)``; a list of extents describes consecutive bytes starting at
the request's offset::

    request          |<------------- length ------------->|
    source extents   |==a==|====b====|==b==|=====c=====|======d=====|
    reply            |==a==|=====b=======|=====c=====|==d==|     (b merged, d clipped)

With REQ_ONE only the first extent is sent, clipped to the request length.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

Extent = tuple[int, int]


def normalize_extents(
    extents: Iterable[Extent], length: int, *, limit: int, max_extent: int
) -> list[Extent]:
    """Return extents covering at most ``length`` bytes, merged, at most ``limit`` of them.

    ``max_extent`` caps a single descriptor (2^32 - 1 in compact replies).
    Zero-length extents are dropped. The result is never empty when ``length`` > 0 and the
    source covered at least one byte.
    """
    out: list[Extent] = []
    covered = 0
    for ext_length, flags in extents:
        if covered >= length:
            break
        if ext_length <= 0:
            continue
        ext_length = min(ext_length, length - covered)
        covered += ext_length
        if out and out[-1][1] == flags:
            merged = out[-1][0] + ext_length
            if merged <= max_extent:
                out[-1] = (merged, flags)
                continue
            # Split at the cap; the rest starts a new descriptor.
            out[-1] = (max_extent, flags)
            ext_length = merged - max_extent
        while ext_length > max_extent:
            if len(out) >= limit:
                return out
            out.append((max_extent, flags))
            ext_length -= max_extent
        if len(out) >= limit:
            break
        out.append((ext_length, flags))
    return out


@dataclass(frozen=True)
class PackedExtents:
    """Descriptors already in wire form — ``count`` of them, compact (length u32, flags u32)
    or ``extended`` (u64, u64), clipped to the request, merged and within its limit — sent
    as they are (a frozen dirty bitmap packs its whole disk once)."""

    data: bytes | bytearray
    count: int
    extended: bool


class StatusSource(Protocol):
    """A context whose descriptors are known at once, in wire form (compact or extended, as
    negotiated; a frozen dirty bitmap): the server answers its block status straight from the
    received bytes. Both take ``offset < end <=`` the export's size."""

    def first(self, offset: int, end: int) -> tuple[int, int]:
        """The one descriptor ``(length, flags)`` of a REQ_ONE request, clipped to it."""
        ...

    def descriptors(self, offset: int, end: int, limit: int) -> tuple[bytes | bytearray, int]:
        """At most ``limit`` descriptors of ``[offset, end)``, clipped, merged, in wire form,
        and how many (at least one)."""
        ...
