"""A test-owned qemu-storage-daemon (it outlives nbdsrv, as a real VM would) and an nbdsrv
daemon (daemon.DaemonProcess) attached to it with --qmp, which tests may kill and restart.
Fixtures: workdir, vm (parametrize indirectly with image specs: "qcow2", "qcow2v2", "raw"),
nbdsrv."""

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from nbdsrv.qemu.storage_daemon import StorageDaemon
from tests.harness.daemon import DaemonProcess
from tests.harness.dirs import short_tmp_dir
from tests.harness.qmp import SyncQMP
from tests.harness.tools import require_tool

K = 1024
MiB = 1024 * 1024
DISK_SIZE = 16 * MiB
# The default checkpoint granularity: dirty maps are compared in blocks of this size.
GRANULARITY = 64 * K
# Copies the dirty extents of a context with libnbd, as a backup tool does (Debian's python3).
COPY_SCRIPT = Path(__file__).parents[2] / "scripts" / "incremental_copy.py"


def blocks(ranges: Sequence[Sequence[int]]) -> set[int]:
    """The GRANULARITY-sized blocks that (offset, length) ranges touch."""
    return {b for o, n in ranges for b in range(o // GRANULARITY, (o + n - 1) // GRANULARITY + 1)}


class ExternalQSD:
    """The VM: a qemu-storage-daemon that the test owns (it outlives nbdsrv, as a real VM
    would), started by the product's `StorageDaemon`: the disks exported writable on its live
    socket, so the test writes the way a guest would, one QMP socket for nbdsrv and one for
    the test (`qmp`, synchronous)."""

    def __init__(self, workdir: Path, images: list[Path]) -> None:
        self.workdir = workdir
        self.images = images
        self.daemon = self._storage_daemon()
        assert self.daemon.test_qmp_path is not None
        # nbdsrv gets StorageDaemon's second ("test") socket, so that the harness's clients
        # (StorageDaemon's monitor while it starts, then `qmp`) never race nbdsrv's reconnects.
        self.qmp_path = str(self.daemon.test_qmp_path)
        self.test_qmp_path = str(self.daemon.qmp_path)
        self.nbd_path = str(self.daemon.live_socket)
        # StorageDaemon is asynchronous; the test drives it on a loop of its own.
        self.loop = asyncio.new_event_loop()
        self.qmp: SyncQMP | None = None
        # What each disk holds now, byte for byte (all images start empty).
        self.models = [bytearray(DISK_SIZE) for _ in images]

    def _storage_daemon(self) -> StorageDaemon:
        qsd = require_tool("qemu-storage-daemon")
        return StorageDaemon("vm", self.images, self.workdir, test_monitor=True, qsd=qsd)

    @property
    def pid(self) -> int:
        assert self.daemon.pid is not None
        return self.daemon.pid

    def start(self) -> None:
        """Start (again) on `images` as they are now (a test may point a disk at its top)."""
        self.daemon = self._storage_daemon()
        self.loop.run_until_complete(self._start())
        self.qmp = SyncQMP(self.test_qmp_path)

    async def _start(self) -> None:
        await self.daemon.start()
        # A QMP socket serves one client: make room for `qmp`.
        await self.daemon.monitor.close()

    def write(self, disk: int, pattern: int, offset: int, length: int) -> None:
        """Write through QEMU's live export (a BlockBackend that exists all along), and into
        the test's model of the disk."""
        self.models[disk][offset : offset + length] = bytes([pattern]) * length
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                f"write -P {pattern} {offset} {length}",
                f"nbd+unix:///disk{disk}?socket={self.nbd_path}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def kill(self) -> None:
        """SIGKILL, as when the VM crashes; `start` brings it back on the same images."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        os.kill(self.pid, signal.SIGKILL)
        # Reaps it and removes its sockets, as a VM's management would before a restart.
        self.loop.run_until_complete(self.daemon.stop())

    def stop(self) -> None:
        """Quit QEMU (persistent bitmaps are written on a clean quit); `start` may follow."""
        if self.qmp is not None:
            self.qmp.quit()
            self.qmp = None
        self.loop.run_until_complete(self.daemon.stop())

    def close(self) -> None:
        """Stop for good."""
        self.stop()
        self.loop.close()


def attached_daemon(workdir: Path, vm: ExternalQSD, *args: str) -> DaemonProcess:
    """`nbdsrv daemon --qmp vm1=…` attached to ``vm``, not started yet: state in
    ``workdir/state``, its NBD server on ``workdir/nbd.sock``; ``args`` are more options."""
    return DaemonProcess(
        [*_attached_args(workdir, vm.qmp_path, vm.nbd_path), *args],
        workdir / "control.sock",
        workdir / "nbdsrv.log",
    )


def _attached_args(workdir: Path, qmp_path: str, live_socket: str) -> list[str]:
    return ["--state-dir", str(workdir / "state"), "--listen", f"unix:{workdir / 'nbd.sock'}",
            "--qmp", f"vm1={qmp_path}", "--qemu-nbd", f"vm1={live_socket}"]  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmp_dir("nbdsrv-c-") as path:
        yield path


def make_images(workdir: Path, *specs: str) -> list[Path]:
    images = []
    for i, spec in enumerate(specs):
        path = workdir / f"d{i}.{'raw' if spec == 'raw' else 'qcow2'}"
        options = ["-o", "compat=0.10"] if spec == "qcow2v2" else []
        fmt = "raw" if spec == "raw" else "qcow2"
        subprocess.run(
            [
                require_tool("qemu-img"),
                "create",
                "-q",
                "-f",
                fmt,
                *options,
                str(path),
                str(DISK_SIZE),
            ],
            check=True,
        )
        images.append(path)
    return images


@pytest.fixture
def vm(workdir: Path, request: pytest.FixtureRequest) -> Iterator[ExternalQSD]:
    specs = getattr(request, "param", ("qcow2",))
    require_tool("qemu-io")
    qsd = ExternalQSD(workdir, make_images(workdir, *specs))
    qsd.start()
    yield qsd
    qsd.close()


@pytest.fixture
def nbdsrv(workdir: Path, vm: ExternalQSD) -> Iterator[DaemonProcess]:
    """A started `attached_daemon`; stopped (exit 0 required) at teardown."""
    daemon = attached_daemon(workdir, vm)
    daemon.start()
    try:
        yield daemon
        daemon.stop()
    finally:
        daemon.kill()
