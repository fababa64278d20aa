"""Meta-context queries with QEMU's semantics (QEMU's qemu/nbd/server.c, qemu/docs/interop/nbd.rst).

- ``base:allocation`` and ``qemu:allocation-depth`` and ``qemu:dirty-bitmap:NAME`` match
  exactly; for LIST only, ``base:`` selects base:allocation, ``qemu:`` every ``qemu:`` context
  and ``qemu:dirty-bitmap:`` every bitmap. LIST with no query lists everything.
- Anything else (unknown namespace or leaf, over-long or non-UTF-8 query) is skipped silently.
- Context ids follow QEMU: base:allocation 0, qemu:allocation-depth 1, bitmaps 2, 3, ...
- Replies come in id order, each context once, however often it was asked for.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from .constants import ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX


@dataclass(frozen=True)
class MetaContext:
    id: int
    name: str


def numbered_contexts(offered: Sequence[str]) -> list[MetaContext]:
    """Give each offered context its QEMU-style id, in id order."""
    out: list[MetaContext] = []
    bitmap_id = 2
    for name in offered:
        if name == BASE_ALLOCATION:
            out.append(MetaContext(0, name))
        elif name == ALLOCATION_DEPTH:
            out.append(MetaContext(1, name))
        else:
            out.append(MetaContext(bitmap_id, name))
            bitmap_id += 1
    out.sort(key=lambda c: c.id)
    return out


def _query_matches(query: str, name: str, *, listing: bool) -> bool:
    if query == name:
        return True
    if not listing:
        return False
    if query == "base:":
        return name == BASE_ALLOCATION
    if query == "qemu:":
        return name.startswith("qemu:")
    if query == DIRTY_BITMAP_PREFIX:
        return name.startswith(DIRTY_BITMAP_PREFIX)
    return False


def select_contexts(
    offered: Sequence[str], queries: Sequence[str], *, listing: bool
) -> list[MetaContext]:
    """The contexts a LIST (``listing``) or SET with these queries selects, in id order."""
    numbered = numbered_contexts(offered)
    if listing and not queries:
        return numbered
    return [c for c in numbered if any(_query_matches(q, c.name, listing=listing) for q in queries)]
