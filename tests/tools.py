"""Old home of the program and daemon helpers, kept for branches written against it: new code
imports tests.harness.tools, tests.harness.daemon and tests.harness.qmp."""

from tests.harness.daemon import DaemonProcess, nbdsrv_argv, qmp_daemon
from tests.harness.qmp import SyncQMP
from tests.harness.tools import SYSTEM_PATH_FIRST, TIMEOUT, require_tool, run, run_fails, run_result

__all__ = [
    "SYSTEM_PATH_FIRST",
    "TIMEOUT",
    "DaemonProcess",
    "SyncQMP",
    "nbdsrv_argv",
    "qmp_daemon",
    "require_tool",
    "run",
    "run_fails",
    "run_result",
]
