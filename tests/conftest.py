"""Shared fixtures: the test images (tests/harness/images.py) and a real ``nbdsrv daemon``
subprocess (tests/harness/daemon.py) serving them (tests/harness/served.py).

``nbdsrv`` serves two ``--file`` exports, ``sparse`` and ``odd``, on a unix socket and on TCP
(127.0.0.1, port 0).

Every daemon started through ``nbdsrv_daemons`` is stopped at teardown with SIGTERM and must
exit 0 having removed its unix and control sockets and logged no traceback. Its stderr is
attached to failed reports.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import DaemonProcess, StartDaemon
from tests.harness.dirs import short_tmp_dir
from tests.harness.images import (
    ODD_SIZE,
    SPARSE_RUNS,
    SPARSE_SIZE,
    ImageFile,
    KiB,
    MiB,
    layout_of,
    make_odd_image,
    make_sparse_image,
)
from tests.harness.served import Served, serve_images

# Names other branches import from here (tests.conftest); new code imports tests.harness.*.
__all__ = [
    "ODD_SIZE",
    "SPARSE_RUNS",
    "SPARSE_SIZE",
    "ImageFile",
    "KiB",
    "MiB",
    "Served",
    "StartDaemon",
    "layout_of",
    "make_odd_image",
    "make_sparse_image",
]

_daemons_key = pytest.StashKey[list[DaemonProcess]]()


@pytest.fixture
def test_images(tmp_path: Path) -> dict[str, ImageFile]:
    """The exported files by export name. The sparse one checks that this file system
    reports holes as written, so a failure in the map tests is the server's."""
    images = {
        "sparse": make_sparse_image(tmp_path / "sparse.raw"),
        "odd": make_odd_image(tmp_path / "odd.bin"),
    }
    with open(images["sparse"].path, "rb") as f:
        data = os.lseek(f.fileno(), 0, os.SEEK_DATA)
        hole = os.lseek(f.fileno(), 0, os.SEEK_HOLE)
    if (data, hole) != (0, 64 * KiB):
        pytest.skip(f"{tmp_path} does not report holes exactly (SEEK_DATA/SEEK_HOLE)")
    return images


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for sockets: unix socket paths must fit in 107 bytes."""
    with short_tmp_dir("nbdsrv-t-") as path:
        yield path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for daemon in item.stash.get(_daemons_key, []):
            report.sections.append((f"nbdsrv daemon stderr ({daemon.log_path})", daemon.log()))
    return report


@pytest.fixture
def nbdsrv_daemons(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[StartDaemon]:
    """``start(*args, name="d0")`` starts ``nbdsrv daemon --state-dir … --control … *args``
    with state, control socket and log in a short temporary directory, and waits until it is
    ready. At teardown each daemon still running gets SIGTERM; every daemon must have exited
    with status 0, removed its control socket and its ``unix:`` listen sockets, and logged
    no traceback."""
    daemons: list[DaemonProcess] = []
    request.node.stash[_daemons_key] = daemons

    def start(*args: str, name: str = "") -> DaemonProcess:
        name = name or f"d{len(daemons)}"
        daemon = DaemonProcess(
            ["--state-dir", str(short_dir / f"{name}.state"), *args],
            control=short_dir / f"{name}.ctl",
            log_path=short_dir / f"{name}.log",
        )
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start

    problems = []
    for daemon in daemons:
        try:
            rc = daemon.stop()
        except pytest.fail.Exception as e:  # it did not stop: killed, and the others still run
            problems.append(str(e))
            continue
        finally:
            daemon.kill()
        if rc != 0:
            problems.append(f"{daemon.log_path.name}: exit status {rc}, expected 0")
        sockets = [daemon.control] + [
            arg.removeprefix("unix:") for arg in daemon.args if arg.startswith("unix:")
        ]
        for path in sockets:
            if os.path.lexists(path):
                problems.append(f"{daemon.log_path.name}: {path} left behind after exit")
        if "Traceback" in daemon.log():
            problems.append(f"{daemon.log_path.name}: a traceback in the daemon's log")
    if problems:
        logs = "\n".join(f"--- {d.log_path.name}\n{d.log()}" for d in daemons)
        pytest.fail("unclean daemon exit:\n" + "\n".join(problems) + "\n" + logs, pytrace=False)


@pytest.fixture
def nbdsrv(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path
) -> Generator[Served, None, None]:
    """A real ``nbdsrv daemon`` exporting ``sparse`` and ``odd`` on unix and TCP."""
    yield serve_images(nbdsrv_daemons, test_images, short_dir)
