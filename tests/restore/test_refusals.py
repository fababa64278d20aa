"""Bad input to restore begin and end: one clear sentence each, nothing created or changed."""

import asyncio
import subprocess
from pathlib import Path

import pytest

from nbdsrv.errors import NbdsrvError, NotFoundError
from nbdsrv.restore.sessions import BeginRestore
from tests.harness.tools import require_tool, stop_process
from tests.restore.conftest import Served, file_sha256, tool

MiB = 1024 * 1024


async def refused(restore: Served, request: BeginRestore, words: str) -> str:
    with pytest.raises(NbdsrvError) as excinfo:
        await restore.sessions.begin(request)
    message = str(excinfo.value)
    assert words in message and "\n" not in message, message
    assert restore.sessions.list() == []
    assert restore.server.catalog.list_exports() == []
    return message


@pytest.mark.parametrize(
    ("request_of", "words"),
    [
        (lambda d: BeginRestore(image=str(d / "new.qcow2")), "give --size"),
        (lambda d: BeginRestore(image=str(d / "no/dir.qcow2"), size=MiB), "no directory"),
        (lambda d: BeginRestore(image=str(d / "new.img"), size=MiB, format="vmdk"), "--format"),
        (lambda d: BeginRestore(image=str(d / "new.img"), size=-1), "--size must be"),
        (
            lambda d: BeginRestore(
                image=str(d / "new.raw"), size=MiB, format="raw", source="nbd://localhost/x"
            ),
            "raw image cannot have the source",
        ),
        (lambda d: BeginRestore(image=str(d / "n.qcow2"), source="http://x/y"), "bad --source"),
        (lambda d: BeginRestore(image=str(d / "n.qcow2"), source="nbd+unix:///x"), "?socket="),
        (lambda d: BeginRestore(image=str(d / "n.qcow2"), source="nbds://h/x"), "TLS"),
        (
            lambda d: BeginRestore(
                image=str(d / "n.qcow2"), source=f"nbd+unix:///x?socket={d}/none"
            ),
            "source unreachable",
        ),
    ],
)
async def test_bad_begin_creates_nothing(
    restore: Served, tmp_path: Path, request_of: object, words: str
) -> None:
    request = request_of(tmp_path)  # type: ignore[operator]
    before = sorted(p.name for p in tmp_path.iterdir())
    await refused(restore, request, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


async def test_size_mismatch_with_an_existing_image(restore: Served, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * MiB)
    await refused(restore, BeginRestore(image=str(image), size=2 * MiB), "not --size")
    assert file_sha256(image) == file_sha256(image)
    assert image.read_bytes() == b"\x5a" * MiB


async def test_an_image_a_running_qemu_holds_is_refused(restore: Served, tmp_path: Path) -> None:
    image = tmp_path / "busy.qcow2"
    await tool("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(MiB))
    socket = tmp_path / "holder.sock"
    holder = subprocess.Popen(
        [require_tool("qemu-nbd"), "-k", str(socket), "-f", "qcow2", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if socket.exists():
                break
            await asyncio.sleep(0.05)
        message = await refused(restore, BeginRestore(image=str(image)), "lock")
        assert str(image) in message
    finally:
        stop_process(holder)


async def test_a_second_restore_of_the_same_image(restore: Served, tmp_path: Path) -> None:
    image = tmp_path / "one.qcow2"
    began = await restore.sessions.begin(BeginRestore(image=str(image), size=MiB))
    with pytest.raises(NbdsrvError, match="being restored already"):
        await restore.sessions.begin(BeginRestore(image=str(tmp_path / "." / "one.qcow2")))
    assert len(restore.sessions.list()) == 1
    await restore.sessions.end(began["id"])


async def test_end_of_an_unknown_session(restore: Served) -> None:
    with pytest.raises(NotFoundError, match="no restore session 'nope'"):
        await restore.sessions.end("nope")
