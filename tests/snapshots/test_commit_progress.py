"""`snapshot commit` shows its job's progress on a terminal, and nothing otherwise."""

import os
import pty
import subprocess
import sys

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, MiB


def test_commit_progress_on_a_terminal_only(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("snapshot", "create", "vm1")
    vm.write(0, 0x5A, 0, 12 * MiB)
    primary, secondary = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "nbdsrv", "snapshot", "commit", "vm1",
             "--control", nbdsrv.control],
            stdout=subprocess.PIPE, stderr=secondary, timeout=120,
        )  # fmt: skip
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO once the terminal has no writer left
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if secondary >= 0:
            os.close(secondary)
        os.close(primary)
    assert result.returncode == 0
    assert b"disk0:" in result.stdout and b"committed" in result.stdout
    assert b"committing:" in shown and b"100.0%" in shown

    nbdsrv.json("snapshot", "create", "vm1")
    vm.write(0, 0x5B, 0, 12 * MiB)
    quiet = nbdsrv.cli("snapshot", "commit", "vm1")
    assert quiet.returncode == 0 and quiet.stderr == ""
