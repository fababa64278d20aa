"""Files that only the daemon's user may read (mode 0600), written whole."""

import os


def write_whole(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Create or truncate ``path`` (mode 0600) and write all of ``data``; with ``fsync``, on
    disk before returning. OSError as the system says it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
