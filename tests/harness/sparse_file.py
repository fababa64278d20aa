"""Sparse test images: random data in given runs, holes everywhere else."""

import os
import random
from collections.abc import Sequence
from pathlib import Path


def write_sparse(path: Path, size: int, runs: Sequence[tuple[int, int]], seed: int) -> bytes:
    """Write a sparse file of ``size`` bytes with random data at each ``(offset, length)``
    of ``runs`` (seeded); return its whole content."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in runs:
            data = rng.randbytes(length)
            content[offset : offset + length] = data
            os.pwrite(f.fileno(), data, offset)
    return bytes(content)
