"""Extent lists as the tests compare them, written apart from nbdsrv's own extent code."""


def merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(length, flags)`` extents with equal neighbours joined."""
    out: list[tuple[int, int]] = []
    for n, f in extents:
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out
