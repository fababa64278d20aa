"""Fixtures for tests against a real qemu-storage-daemon."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nbdsrv.qemu.storage_daemon import StorageDaemon
from tests.harness.dirs import short_tmp_dir
from tests.harness.tools import require_tool

SIZE = 4 * 1024 * 1024


def make_image(path: Path, fmt: str, *, backing: Path | None = None) -> Path:
    argv = [require_tool("qemu-img"), "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    argv += [str(path)]
    if backing is None:
        argv.append(str(SIZE))
    subprocess.run(argv, check=True)
    return path


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short directory: unix socket paths must fit in 107 bytes."""
    with short_tmp_dir("nbdsrv-q-") as path:
        yield path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return [make_image(tmp_path / "a.qcow2", "qcow2"), make_image(tmp_path / "b.raw", "raw")]


class Exits:
    """Records what StorageDaemon's watcher reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.event = asyncio.Event()

    def __call__(self, returncode: int, tail: str) -> None:
        self.calls.append((returncode, tail))
        self.event.set()


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
async def qsd(images: list[Path], state_dir: Path, exits: Exits) -> AsyncIterator[StorageDaemon]:
    require_tool("qemu-storage-daemon")
    daemon = StorageDaemon("vm", images, state_dir, test_monitor=True, on_exit=exits)
    await daemon.start()
    yield daemon
    await daemon.stop()


async def qemu_io(uri: str, command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        require_tool("qemu-io"),
        "-f",
        "raw",
        "-c",
        command,
        uri,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
