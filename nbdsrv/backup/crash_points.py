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
