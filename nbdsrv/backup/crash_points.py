"""Crash points for the crash-safety tests.

``NBDSRV_FAULT=NAME`` makes the daemon kill itself with SIGKILL when it reaches the point
NAME, so a test can prove that a restart repairs whatever was half done there. Unset in
normal operation: then every point is a no-op.
"""

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("NBDSRV_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def scratch_file(filename: str) -> dict[str, object]:
    """The blockdev options of a scratch image's file. With
    ``NBDSRV_FAULT=scratch-write-error`` every data write into it fails with EIO (QEMU's
    blkdebug driver), so a test can make the fleecing job fail."""
    file: dict[str, object] = {"driver": "file", "filename": filename}
    if os.environ.get("NBDSRV_FAULT") == "scratch-write-error":
        return {
            "driver": "blkdebug",
            "image": file,
            "inject-error": [{"event": "write_aio", "errno": 5}],
        }
    return file
