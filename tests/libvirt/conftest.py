"""Fixtures for tests against a real libvirtd (``qemu:///system``).

- ``libvirtd`` (session) — a libvirtd that answers. There is no systemd on these machines, so
  when none runs it starts ``virtlogd -d`` and ``libvirtd -d`` as root and stops them again at
  the end of the session. A fresh libvirtd probes QEMU before it answers (about 10 s here).
- ``libvirt_conn`` — a ``virConnect`` of the test process itself.
- ``domains`` — a :class:`~tests.libvirt.domains.DomainFactory`; every domain it made is
  destroyed and its images removed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.tools import require_tool, run_result
from tests.libvirt.domains import URI, DomainFactory, system_libvirt

READY_TIMEOUT = 120.0
LIBVIRTD_PID = Path("/run/libvirtd.pid")
VIRTLOGD_PID = Path("/run/virtlogd.pid")


def _answers() -> bool:
    return run_result([require_tool("virsh"), "-c", URI, "version"]).returncode == 0


def _start(program: str, pidfile: Path) -> int | None:
    """Start ``program -d`` unless the process its pid file names is alive; return the pid of
    the one started here, else None."""
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return None
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    result = run_result([require_tool(program), "-d"])
    if result.returncode != 0:
        pytest.fail(f"{program} -d failed: {result.stderr.strip()}", pytrace=False)
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{program} -d wrote no {pidfile}", pytrace=False)
        time.sleep(0.05)
    return int(pidfile.read_text())


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """The URI of a libvirtd that answers."""
    system_libvirt()
    if _answers():
        yield URI
        return
    if os.geteuid() != 0:
        message = "no libvirtd runs and only root can start one"
        if os.environ.get("NBDSRV_REQUIRE_TOOLS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    started = [
        pidfile
        for pidfile, pid in (
            (VIRTLOGD_PID, _start("virtlogd", VIRTLOGD_PID)),
            (LIBVIRTD_PID, _start("libvirtd", LIBVIRTD_PID)),
        )
        if pid is not None
    ]
    deadline = time.monotonic() + READY_TIMEOUT
    while not _answers():
        if time.monotonic() > deadline:
            pytest.fail(f"libvirtd does not answer after {READY_TIMEOUT:g} s", pytrace=False)
        time.sleep(0.2)
    yield URI
    # By pid file: a test may have restarted libvirtd (restart_libvirtd).
    for pidfile in reversed(started):  # libvirtd before virtlogd
        with contextlib.suppress(FileNotFoundError, ValueError):
            _stop(int(pidfile.read_text()))


def restart_libvirtd() -> None:
    """Stop the running libvirtd and start another (QEMU and its jobs keep running)."""
    _stop(int(LIBVIRTD_PID.read_text()))
    LIBVIRTD_PID.unlink(missing_ok=True)
    _start("libvirtd", LIBVIRTD_PID)
    deadline = time.monotonic() + READY_TIMEOUT
    while not _answers():
        if time.monotonic() > deadline:
            pytest.fail(f"libvirtd does not answer after {READY_TIMEOUT:g} s", pytrace=False)
        time.sleep(0.2)


@pytest.fixture
def libvirt_conn(libvirtd: str) -> Iterator[Any]:
    """The test's own connection (one per test: a libvirtd restart closes it)."""
    libvirt = system_libvirt()
    conn = libvirt.open(libvirtd)
    yield conn
    conn.close()


@pytest.fixture
def domains(libvirt_conn: Any, request: pytest.FixtureRequest) -> Iterator[DomainFactory]:
    # Short, unique and recognisable: several test runs may share one libvirtd.
    test = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name.removeprefix("test_"))[:24]
    factory = DomainFactory(libvirt_conn, f"nbdsrv{os.getpid()}-{test}")
    yield factory
    factory.close()
