"""``python -m nbdsrv daemon …`` as a subprocess, and its CLI: started (optionally with an
injected fault), polled until ``nbdsrv status`` answers, stopped with a signal and checked for
a clean exit; its ``--json`` answers parsed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.harness.tools import TIMEOUT, run, run_result

READY_TIMEOUT = 20.0


def nbdsrv_argv(*args: str) -> list[str]:
    """The nbdsrv CLI of the Python running the tests."""
    return [sys.executable, "-m", "nbdsrv", *args]


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed nbdsrv command says: it exits 1 with one ``nbdsrv: error: …`` line."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdsrv: error: "), result.stderr
    return lines[0].removeprefix("nbdsrv: error: ")


class DaemonProcess:
    """``nbdsrv daemon`` in a subprocess, and its CLI; stdout and stderr go to ``log_path``.

    >>> d = DaemonProcess(["--state-dir", s, "--listen", f"unix:{n}", "--file", "a=/x"], c, log)
    >>> d.start(); d.json("status"); d.uri("a"); ...; d.stop()

    ``stop`` fails the test unless the daemon exits 0; a daemon a test killed (or that
    crashed at an injected fault, see ``start(fault=…)``) can be started again.
    """

    def __init__(self, args: Sequence[str], control: str | Path, log_path: str | Path) -> None:
        self.args = list(args)
        self.control = str(control)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def _option(self, name: str) -> str | None:
        for option, value in zip(self.args, self.args[1:], strict=False):
            if option == name:
                return value
        return None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def state_dir(self) -> str:
        """The ``--state-dir`` the daemon was given."""
        value = self._option("--state-dir")
        assert value is not None, "no --state-dir"
        return value

    @property
    def nbd_socket(self) -> str:
        """The first ``--listen unix:PATH``."""
        for option, value in zip(self.args, self.args[1:], strict=False):
            if option == "--listen" and value.startswith("unix:"):
                return value.removeprefix("unix:")
        raise AssertionError("no --listen unix:PATH")

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def log(self) -> str:
        """The daemon's stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = READY_TIMEOUT, *, fault: str | None = None) -> dict[str, Any]:
        """Start the daemon and wait until ``nbdsrv status`` answers; return the status.
        ``fault`` is an injected crash point (``NBDSRV_FAULT``, nbdsrv/backup/crash_points.py)."""
        argv = nbdsrv_argv("daemon", "--control", self.control, *self.args)
        env = {k: v for k, v in os.environ.items() if k != "NBDSRV_FAULT"}
        if fault:
            env["NBDSRV_FAULT"] = fault
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.returncode = None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                pytest.fail(
                    f"nbdsrv daemon exited with status {self.returncode} before it was ready\n"
                    f"command: {shlex.join(argv)}\nstderr:\n{self.log()}",
                    pytrace=False,
                )
            result = self.cli("status", "--json")
            if result.returncode == 0:
                status: dict[str, Any] = json.loads(result.stdout)
                return status
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(
                    f"nbdsrv daemon not ready after {timeout:g} s\n"
                    f"last status error: {result.stderr.strip()}\nstderr:\n{self.log()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``nbdsrv ARGS --control …`` and return whatever happened."""
        return run_result(nbdsrv_argv(*args, "--control", self.control), timeout=60)

    def json(self, *args: str) -> Any:
        """Run ``nbdsrv ARGS --json``, require success and return its answer."""
        return json.loads(run(nbdsrv_argv(*args, "--control", self.control, "--json"), timeout=60))

    def error(self, *args: str) -> str:
        """Run a command that must fail; return its one error line."""
        return error_line(self.cli(*args))

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.json("status")
        return status

    def checkpoints(self, vm: str = "vm1") -> list[dict[str, Any]]:
        return list(self.json("checkpoint", "list", vm))

    def wait_killed(self) -> None:
        """Wait for a daemon that kills itself (an injected fault) to be gone."""
        assert self.proc is not None
        assert self.proc.wait(TIMEOUT) == -signal.SIGKILL
        self.returncode = self.proc.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send ``sig`` to a running daemon; it must exit with status 0 within ``timeout``,
        else the test fails (a daemon that does not stop is killed). A daemon that has
        already exited is left alone. Returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(
                    f"nbdsrv daemon still running {timeout:g} s after "
                    f"{signal.Signals(sig).name}\nstderr:\n{self.log()}",
                    pytrace=False,
                )
            if self.proc.returncode != 0:
                pytest.fail(
                    f"nbdsrv daemon exited with status {self.proc.returncode} after "
                    f"{signal.Signals(sig).name}\nstderr:\n{self.log()}",
                    pytrace=False,
                )
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        """Last resort: SIGKILL the daemon and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def qmp_daemon(workdir: Path, qmp_path: str | Path, vm: str = "vm") -> DaemonProcess:
    """``nbdsrv daemon --qmp VM=…`` for a QEMU the test runs, not started yet: state in
    ``workdir/state``, control on ``workdir/control.sock``, NBD on ``workdir/nbd.sock``."""
    control = workdir / "control.sock"
    return DaemonProcess(
        ["--state-dir", str(workdir / "state"), "--listen", f"unix:{workdir / 'nbd.sock'}",
         "--qmp", f"{vm}={qmp_path}"],
        control, workdir / "daemon.log",
    )  # fmt: skip


# The ``nbdsrv_daemons`` fixture (tests/conftest.py): ``start(*args, name="d0")``.
StartDaemon = Callable[..., DaemonProcess]
