"""Making way for a new unix socket without deleting anything that is not ours to delete."""

import contextlib
import errno
import os
import socket
import stat

# A live listener accepts (or queues) a local connect at once; this only bounds a wedged one.
PROBE_TIMEOUT = 2.0


def clear_stale_socket(path: str) -> None:
    """Remove a socket left at ``path`` by a process that is gone, so that ``bind`` succeeds.

    A socket that still accepts connections belongs to a running process (another daemon on
    the same state directory): EADDRINUSE. Anything other than a socket is never removed:
    EEXIST. A missing path is fine.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: stale
        except OSError as e:
            raise OSError(e.errno, f"{path} is in use by another process: {e}") from e
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
