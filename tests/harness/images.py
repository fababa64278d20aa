"""The test images a daemon exports, with a known layout.

``sparse`` (8 MiB), data written at known offsets, holes everywhere else::

    0     64K          1M    1M+128K      4M+64K 4M+128K            8M-4K  8M
    |0x11 |   hole     |0x22 |   hole     |0x33  |     hole         |0x44 |
    ^ data runs are 4 KiB aligned, so every file system reports them exactly

``odd`` (5000 bytes, not a multiple of 512), random data from a fixed seed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.checksums import sha256

KiB = 1024
MiB = 1024 * KiB

SPARSE_SIZE = 8 * MiB
# (offset, length, byte) of every data run of the sparse image, in order.
SPARSE_RUNS = [
    (0, 64 * KiB, 0x11),
    (1 * MiB, 128 * KiB, 0x22),
    (4 * MiB + 64 * KiB, 64 * KiB, 0x33),
    (SPARSE_SIZE - 4 * KiB, 4 * KiB, 0x44),
]
ODD_SIZE = 5000


@dataclass(frozen=True)
class ImageFile:
    """A file exported by the daemon, with what a client must read from it."""

    name: str
    path: Path
    size: int
    # (offset, length, is_data) covering the whole file, in order.
    layout: tuple[tuple[int, int, bool], ...]
    # (offset, length, byte) of the runs filled with one byte value.
    patterns: tuple[tuple[int, int, int], ...] = ()

    def content(self) -> bytes:
        return self.path.read_bytes()

    def sha256(self) -> str:
        return sha256(self.content())


def layout_of(size: int, runs: Sequence[tuple[int, int, int]]) -> tuple[tuple[int, int, bool], ...]:
    """Data runs plus the holes between them, covering ``[0, size)``."""
    layout: list[tuple[int, int, bool]] = []
    pos = 0
    for offset, length, _ in runs:
        if offset > pos:
            layout.append((pos, offset - pos, False))
        layout.append((offset, length, True))
        pos = offset + length
    if pos < size:
        layout.append((pos, size - pos, False))
    return tuple(layout)


def make_sparse_image(path: Path) -> ImageFile:
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, length, byte in SPARSE_RUNS:
            os.pwrite(f.fileno(), bytes([byte]) * length, offset)
        os.fsync(f.fileno())
    layout = layout_of(SPARSE_SIZE, SPARSE_RUNS)
    return ImageFile("sparse", path, SPARSE_SIZE, layout, tuple(SPARSE_RUNS))


def make_odd_image(path: Path) -> ImageFile:
    path.write_bytes(random.Random(5000).randbytes(ODD_SIZE))
    return ImageFile("odd", path, ODD_SIZE, ((0, ODD_SIZE, True),))
