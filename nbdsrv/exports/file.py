"""A local file exported read-only; allocation from SEEK_DATA / SEEK_HOLE."""

import errno
import os
import stat
from collections.abc import Sequence

from ..proto.constants import BASE_ALLOCATION, MAX_BLOCK_STATUS_EXTENTS, AllocationState
from ..proto.extents import Extent
from .export import Export, Segment

HOLE_ZERO = int(AllocationState.HOLE | AllocationState.ZERO)
# Holes smaller than this inside a read are sent as data: a chunk header costs more.
MIN_READ_HOLE = 4096


class FileExport(Export):
    """A regular file or block device, opened read-only."""

    def __init__(self, name: str, path: str, description: str = "") -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise OSError(errno.EINVAL, f"{path}: not a regular file or block device")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(name, size, description or f"file {path}")
        self.path = path
        self._fd = fd
        self._seekable_holes = stat.S_ISREG(st.st_mode)

    @property
    def contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "kind": "file", "path": self.path}

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    def _next(self, whence: int, offset: int) -> int:
        """SEEK_DATA/SEEK_HOLE from ``offset``; the end of file when there is no more."""
        try:
            return os.lseek(self._fd, offset, whence)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self.size
            raise

    def _allocation(
        self, offset: int, end: int, limit: int = MAX_BLOCK_STATUS_EXTENTS
    ) -> list[tuple[int, int, bool]]:
        """``(start, end, is_data)`` runs from ``offset`` towards ``end``, at most ``limit``
        of them (a reply carries no more anyway, and the client asks again)."""
        if not self._seekable_holes:
            return [(offset, end, True)]
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        data = self._next(os.SEEK_DATA, pos)
        while pos < end and len(runs) < limit:
            if data > pos:
                runs.append((pos, min(data, end), False))
                pos = data
                continue
            # pos is data: the next hole ends this run, and data resumes after that hole.
            hole = self._next(os.SEEK_HOLE, pos)
            runs.append((pos, min(hole, end), True))
            pos = hole
            if pos < end:
                data = self._next(os.SEEK_DATA, pos)
        return runs

    async def read(self, offset: int, length: int) -> list[Segment]:
        segments: list[Segment] = []
        for start, end, is_data in self._read_runs(offset, offset + length):
            if not is_data:
                segments.append((start, end - start, None))
                continue
            data = os.pread(self._fd, end - start, start)
            if len(data) != end - start:
                raise OSError(errno.EIO, f"short read at {start} from {self.path}")
            segments.append((start, end - start, data))
        return segments

    def _read_runs(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """Allocation runs with small holes folded into the data around them."""
        runs: list[tuple[int, int, bool]] = []
        for start, stop, allocated in self._allocation(offset, end, limit=1 << 30):
            is_data = allocated or stop - start < MIN_READ_HOLE
            if runs and runs[-1][2] == is_data:
                runs[-1] = (runs[-1][0], stop, is_data)
            else:
                runs.append((start, stop, is_data))
        return runs

    async def extents(
        self, context: str, offset: int, length: int, limit: int = MAX_BLOCK_STATUS_EXTENTS
    ) -> list[Extent]:
        if context != BASE_ALLOCATION:
            raise ValueError(f"unknown context {context}")
        return [
            (end - start, 0 if is_data else HOLE_ZERO)
            for start, end, is_data in self._allocation(offset, offset + length, limit)
        ]
