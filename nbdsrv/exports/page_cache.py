"""Whether a file range is in the page cache, by the cachestat system call (Linux 6.5):
sendfile of cached pages does not wait for the disk, so it may run on the event loop."""

import ctypes
import errno
import os
import platform
import struct

# cachestat(2) (Linux 6.5) is number 451 on these architectures; elsewhere it is not tried.
_CACHESTAT = 451
_MACHINES = frozenset({"x86_64", "aarch64", "riscv64", "ppc64le", "s390x"})
_RANGE = struct.Struct("=QQ")  # struct cachestat_range {off, len}
_STAT = struct.Struct("=5Q")  # struct cachestat: nr_cache, nr_dirty, nr_writeback, …
PAGE = os.sysconf("SC_PAGE_SIZE")


class PageCache:
    """cachestat when the kernel has it; :meth:`cached` answers None when it does not."""

    def __init__(self) -> None:
        self._syscall = None
        if platform.machine() in _MACHINES:
            try:
                self._syscall = ctypes.CDLL(None, use_errno=True).syscall
            except (OSError, AttributeError):
                self._syscall = None
        self._out = ctypes.create_string_buffer(_STAT.size)
        self.available = self._syscall is not None

    def cached(self, fd: int, offset: int, length: int) -> bool | None:
        """True when every page of ``[offset, offset + length)`` is cached; None when the
        kernel cannot tell (then the caller reads as if it were not)."""
        if self._syscall is None:
            return None
        first = offset // PAGE
        pages = (offset + length + PAGE - 1) // PAGE - first
        rc = self._syscall(_CACHESTAT, fd, _RANGE.pack(first * PAGE, pages * PAGE), self._out, 0)
        if rc != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                self._syscall = None  # this kernel has none (or a filter forbids it)
                self.available = False
            return None
        return bool(_STAT.unpack(self._out.raw)[0] >= pages)
