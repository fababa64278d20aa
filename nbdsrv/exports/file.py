"""A local file exported read-only; allocation from SEEK_DATA / SEEK_HOLE.

Reads never block the event loop on the disk. A connection that writes to its socket itself
gets page-cached data as FileRange (sent with sendfile: no copy in nbdsrv), when cachestat
says every page is there. Otherwise each read is tried with RWF_NOWAIT (served only from
the page cache), and what the cache does not hold is read in a worker thread. They go into
pooled buffers (no fresh memory to fault in and zero per request), which the server hands
back once the reply has left. Holes are searched for only while the file has some.
"""

import asyncio
import errno
import os
import stat
import time
from collections.abc import Sequence

from ..proto.constants import BASE_ALLOCATION, MAX_BLOCK_STATUS_EXTENTS, AllocationState
from ..proto.extents import Extent
from .export import Export, FileRange, Segment
from .page_cache import PageCache

HOLE_ZERO = int(AllocationState.HOLE | AllocationState.ZERO)
# Holes smaller than this inside a read are sent as data: a chunk header costs more.
MIN_READ_HOLE = 4096
# How often a file without holes is looked at again (st_blocks) in case it got some.
HOLE_RECHECK = 1.0
# Free read buffers kept per export, in bytes.
POOL_BYTES = 64 * 1024 * 1024


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
        self._has_holes = self._seekable_holes
        self._holes_checked = -HOLE_RECHECK
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._pool: dict[int, list[bytearray]] = {}
        self._threads = 0  # reads in worker threads: the fd is closed after the last one
        self._sending = 0  # replies with FileRanges not sent yet: likewise
        self._pooled = 0
        self._page_cache = PageCache()

    @property
    def contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "kind": "file", "path": self.path}

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._close_when_unused()

    def _close_when_unused(self) -> None:
        if self.closed and not self._threads and not self._sending and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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

    def _may_have_holes(self) -> bool:
        """Whether a read must look for holes: the file had fewer blocks than bytes when last
        looked at (within HOLE_RECHECK seconds)."""
        if not self._seekable_holes:
            return False
        now = time.monotonic()
        if now - self._holes_checked >= HOLE_RECHECK:
            st = os.fstat(self._fd)
            self._has_holes = st.st_blocks * 512 < st.st_size
            self._holes_checked = now
        return self._has_holes

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(start, end, is_data)`` of a read: one data run unless the file has holes."""
        end = offset + length
        return self._read_runs(offset, end) if self._may_have_holes() else [(offset, end, True)]

    async def read(self, offset: int, length: int) -> list[Segment]:
        segments: list[Segment] = []
        for start, stop, is_data in self._runs(offset, length):
            if not is_data:
                segments.append((start, stop - start, None))
                continue
            segments.append((start, stop - start, await self._pread(start, stop - start)))
        return segments

    async def _pread(self, offset: int, length: int) -> bytearray:
        buffer = self._buffer(length)
        done = 0
        if self._nowait:
            try:
                done = os.preadv(self._fd, [buffer], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                pass  # not in the page cache
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # not on this file system: every read in a thread
        if done < length:
            # The disk would be read: in a worker thread, never on the event loop.
            loop = asyncio.get_running_loop()
            self._threads += 1
            try:
                done += await loop.run_in_executor(None, self._pread_rest, buffer, done, offset)
            finally:
                self._threads -= 1
                self._close_when_unused()
        if done != length:
            raise OSError(errno.EIO, f"short read at {offset} from {self.path}")
        return buffer

    def _pread_rest(self, buffer: bytearray, done: int, offset: int) -> int:
        view = memoryview(buffer)
        start = done
        while done < len(buffer):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done - start

    def _buffer(self, length: int) -> bytearray:
        free = self._pool.get(length)
        if free:
            self._pooled -= length
            return free.pop()
        return bytearray(length)

    def read_cached(self, offset: int, length: int) -> list[Segment] | None:
        if self.closed or not self._page_cache.available:
            return None
        segments: list[Segment] = []
        for start, stop, is_data in self._runs(offset, length):
            if not is_data:
                segments.append((start, stop - start, None))
            elif self._page_cache.cached(self._fd, start, stop - start):
                segments.append((start, stop - start, FileRange(self._fd, start, stop - start)))
            else:
                return None
        self._sending += 1
        return segments

    def release(self, segments: Sequence[Segment]) -> None:
        if any(isinstance(data, FileRange) for _, _, data in segments):
            self._sending -= 1
            self._close_when_unused()
            return
        for _, length, data in segments:
            if isinstance(data, bytearray) and self._pooled + length <= POOL_BYTES:
                self._pool.setdefault(length, []).append(data)
                self._pooled += length

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
