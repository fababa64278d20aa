"""Short temporary directories: a unix socket path must fit in 107 bytes, and pytest's
``tmp_path`` is too long for the sockets a daemon or QEMU makes inside it."""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_tmp_dir(prefix: str = "nbdsrv-t-", parent: str = "/tmp") -> Iterator[Path]:
    """A new directory under ``parent``, removed with all it holds on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
