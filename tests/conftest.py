"""Shared fixtures: test images with a known layout and a real ``nbdsrv daemon`` subprocess.

``nbdsrv`` serves two ``--file`` exports on a unix socket and on TCP (127.0.0.1, port 0):

``sparse`` (8 MiB), data written at known offsets, holes everywhere else::

    0     64K          1M    1M+128K      4M+64K 4M+128K            8M-4K  8M
    |0x11 |   hole     |0x22 |   hole     |0x33  |     hole         |0x44 |
    ^ data runs are 4 KiB aligned, so every file system reports them exactly

``odd`` (5000 bytes, not a multiple of 512), random data from a fixed seed.

Every daemon started through ``nbdsrv_daemons`` is stopped at teardown with SIGTERM and must
exit 0 having removed its unix and control sockets and logged no traceback. Its stderr is
attached to failed reports.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tools import DaemonProcess

KiB = 1024
MiB = 1024 * KiB

SPARSE_SIZE = 8 * MiB
# (offset, length, byte) of every data run of the sparse image, in order.
SPARSE_RUNS = [
    (0, 64 * KiB, 0x11),
    (1 * MiB, 128 * KiB, 0x22),
    (4 * MiB + 64 * KiB, 64 * KiB, 0x33),
    (SPARSE_SIZE - 4 * KiB, 4 * KiB, 0x44),
]
ODD_SIZE = 5000

_daemons_key = pytest.StashKey[list[DaemonProcess]]()


@dataclass(frozen=True)
class ImageFile:
    """A file exported by the daemon, with what a client must read from it."""

    name: str
    path: Path
    size: int
    # (offset, length, is_data) covering the whole file, in order.
    layout: tuple[tuple[int, int, bool], ...]
    # (offset, length, byte) of the runs filled with one byte value.
    patterns: tuple[tuple[int, int, int], ...] = ()

    def content(self) -> bytes:
        return self.path.read_bytes()

    def sha256(self) -> str:
        return hashlib.sha256(self.content()).hexdigest()


def layout_of(size: int, runs: Sequence[tuple[int, int, int]]) -> tuple[tuple[int, int, bool], ...]:
    """Data runs plus the holes between them, covering ``[0, size)``."""
    layout: list[tuple[int, int, bool]] = []
    pos = 0
    for offset, length, _ in runs:
        if offset > pos:
            layout.append((pos, offset - pos, False))
        layout.append((offset, length, True))
        pos = offset + length
    if pos < size:
        layout.append((pos, size - pos, False))
    return tuple(layout)


def make_sparse_image(path: Path) -> ImageFile:
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, length, byte in SPARSE_RUNS:
            os.pwrite(f.fileno(), bytes([byte]) * length, offset)
        os.fsync(f.fileno())
    layout = layout_of(SPARSE_SIZE, SPARSE_RUNS)
    return ImageFile("sparse", path, SPARSE_SIZE, layout, tuple(SPARSE_RUNS))


def make_odd_image(path: Path) -> ImageFile:
    path.write_bytes(random.Random(5000).randbytes(ODD_SIZE))
    return ImageFile("odd", path, ODD_SIZE, ((0, ODD_SIZE, True),))


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
    path = Path(tempfile.mkdtemp(prefix="nbdsrv-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for daemon in item.stash.get(_daemons_key, []):
            report.sections.append((f"nbdsrv daemon stderr ({daemon.log_path})", daemon.log()))
    return report


StartDaemon = Callable[..., DaemonProcess]


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


@dataclass
class Served:
    """A running daemon serving ``images`` on ``unix_socket`` and TCP ``tcp_port``."""

    daemon: DaemonProcess
    images: dict[str, ImageFile]
    unix_socket: str
    tcp_port: int
    status: dict[str, Any]

    @property
    def control(self) -> str:
        return self.daemon.control

    def tcp_uri(self, export: str = "") -> str:
        return f"nbd://127.0.0.1:{self.tcp_port}/{export}"

    def unix_uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.unix_socket}"


@pytest.fixture
def nbdsrv(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path
) -> Generator[Served, None, None]:
    """A real ``nbdsrv daemon`` exporting ``sparse`` and ``odd`` on unix and TCP."""
    unix_socket = str(short_dir / "nbd.sock")
    args = ["--listen", f"unix:{unix_socket}", "--listen", "tcp:127.0.0.1:0"]
    for image in test_images.values():
        args += ["--file", f"{image.name}={image.path}"]
    daemon = nbdsrv_daemons(*args)
    status = daemon.status()
    tcp = [a for a in status["listen"] if a.startswith("tcp:")]
    assert len(tcp) == 1, status["listen"]
    port = int(tcp[0].rpartition(":")[2])
    assert port != 0, status["listen"]
    yield Served(daemon, test_images, unix_socket, port, status)
