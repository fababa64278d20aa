"""Children started through nbdsrv.qemu.parent_death: no Python between fork and exec."""

from __future__ import annotations

import os
import subprocess

from nbdsrv.qemu.parent_death import PARENT_GONE, dies_with_parent


def test_child_runs_with_umask_077_when_its_parent_is_alive() -> None:
    out = subprocess.run(
        dies_with_parent(["sh", "-c", "umask; echo ran"]), capture_output=True, text=True
    )
    assert (out.returncode, out.stdout.split()) == (0, ["0077", "ran"])


def test_child_whose_parent_died_before_the_death_signal_was_set_does_not_run() -> None:
    # A child adopted by another process looks exactly like this to the guard.
    someone_else = os.getppid()
    out = subprocess.run(
        dies_with_parent(["echo", "ran"], parent=someone_else), capture_output=True, text=True
    )
    assert (out.returncode, out.stdout) == (PARENT_GONE, "")
