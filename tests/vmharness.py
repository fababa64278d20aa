"""A test-owned qemu-storage-daemon (it outlives nbdsrv, as a real VM would) and an nbdsrv
daemon attached to it with --qmp, which tests may kill and restart. Fixtures: workdir, vm
(parametrize indirectly with image specs: "qcow2", "qcow2v2", "raw"), nbdsrv."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.qmp_sync import SyncQMP
from tests.tools import require_tool

K = 1024
MiB = 1024 * 1024
DISK_SIZE = 16 * MiB
# The default checkpoint granularity: dirty maps are compared in blocks of this size.
GRANULARITY = 64 * K
# Copies the dirty extents of a context with libnbd, as a backup tool does (Debian's python3).
COPY_SCRIPT = Path(__file__).parents[1] / "scripts" / "incremental_copy.py"


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def blocks(ranges: Sequence[Sequence[int]]) -> set[int]:
    """The GRANULARITY-sized blocks that (offset, length) ranges touch."""
    return {b for o, n in ranges for b in range(o // GRANULARITY, (o + n - 1) // GRANULARITY + 1)}


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class ExternalQSD:
    """qemu-storage-daemon with a QMP socket for nbdsrv and one for the test, and the disks
    exported writable so the test can write the way a guest would."""

    def __init__(self, workdir: Path, images: list[Path]) -> None:
        self.workdir = workdir
        self.images = images
        self.qmp_path = str(workdir / "vm.qmp")
        self.test_qmp_path = str(workdir / "test.qmp")
        self.nbd_path = str(workdir / "live.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: SyncQMP | None = None
        # What each disk holds now, byte for byte (all images start empty).
        self.models = [bytearray(DISK_SIZE) for _ in images]

    def start(self) -> None:
        # A passthrough throttle node under each export, as nbdsrv's own QSD has: a backup
        # session switches its copy-before-write filters in there (nbdsrv/qemu/fleece.py).
        argv = [require_tool("qemu-storage-daemon"), "--object", "throttle-group,id=tg"]
        for i, image in enumerate(self.images):
            fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
            argv += [
                "--blockdev",
                f"driver=file,filename={image},node-name=disk{i}-file",
                "--blockdev",
                f"driver={fmt},file=disk{i}-file,node-name=disk{i}",
                "--blockdev",
                f"driver=throttle,throttle-group=tg,file=disk{i},node-name=disk{i}-live",
            ]
        argv += [
            "--chardev",
            f"socket,id=m0,path={self.qmp_path},server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--chardev",
            f"socket,id=m1,path={self.test_qmp_path},server=on,wait=off",
            "--monitor",
            "chardev=m1",
            "--nbd-server",
            f"addr.type=unix,addr.path={self.nbd_path}",
        ]
        for i in range(len(self.images)):
            argv += [
                "--export",
                f"type=nbd,id=disk{i},node-name=disk{i}-live,name=disk{i},writable=on",
            ]
        with open(self.workdir / "qsd.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stderr=log)
        wait_for(
            lambda: os.path.exists(self.test_qmp_path) and os.path.exists(self.nbd_path),
            "qemu-storage-daemon sockets",
        )
        self.qmp = SyncQMP(self.test_qmp_path)

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
        assert self.proc is not None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for path in (self.qmp_path, self.test_qmp_path, self.nbd_path):
            if os.path.exists(path):
                os.unlink(path)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.qmp is not None:
            self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Nbdsrv:
    """An `nbdsrv daemon --qmp vm1=…` process and its CLI."""

    def __init__(self, workdir: Path, qmp_path: str, qemu_nbd: str) -> None:
        self.qemu_nbd = qemu_nbd
        self.workdir = workdir
        self.state_dir = str(workdir / "state")
        self.control = str(workdir / "control.sock")
        self.qmp_path = qmp_path
        self.nbd_socket = str(workdir / "nbd.sock")
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def start(self, fault: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("NBDSRV_FAULT", None)
        if fault:
            env["NBDSRV_FAULT"] = fault
        with open(self.workdir / "nbdsrv.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nbdsrv",
                    "daemon",
                    "--state-dir",
                    self.state_dir,
                    "--control",
                    self.control,
                    "--listen",
                    f"unix:{self.nbd_socket}",
                    "--qmp",
                    f"vm1={self.qmp_path}",
                    "--qemu-nbd",
                    f"vm1={self.qemu_nbd}",
                    *self.extra_args,
                ],
                stderr=log,
                env=env,
            )
        wait_for(lambda: self.cli("status").returncode == 0, "nbdsrv to be ready")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nbdsrv", *args, "--control", self.control],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def error(self, *args: str) -> str:
        """Run a command that must fail; return its one error line."""
        result = self.cli(*args)
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nbdsrv: error: "), result.stderr
        return lines[0].removeprefix("nbdsrv: error: ")

    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self.json("checkpoint", "list", "vm1"))

    def wait_killed(self) -> None:
        assert self.proc is not None
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbdsrv-c-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
    qsd.stop()


@pytest.fixture
def nbdsrv(workdir: Path, vm: ExternalQSD) -> Iterator[Nbdsrv]:
    daemon = Nbdsrv(workdir, vm.qmp_path, vm.nbd_path)
    daemon.start()
    yield daemon
    daemon.stop()
