"""Scratch images written from a template are the images qemu-img makes, byte for byte, and
QEMU opens them as empty qcow2 disks of the size asked for."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from nbdsrv.qemu import scratch_image
from nbdsrv.qemu.errors import QEMUError
from tests.harness.tools import require_tool

GiB = 1 << 30


@pytest.fixture(autouse=True)
def no_templates() -> None:
    scratch_image._templates.clear()


@pytest.mark.parametrize("size", [64 << 20, 10 * GiB, (1 << 40) + 512])
async def test_a_scratch_image_is_what_qemu_img_creates(tmp_path: Path, size: int) -> None:
    qemu_img = require_tool("qemu-img")
    reference = tmp_path / "reference.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(reference), str(size)], check=True)
    first, second = tmp_path / "first.qcow2", tmp_path / "second.qcow2"
    await scratch_image.create(str(first), size)  # runs qemu-img
    await scratch_image.create(str(second), size)  # from the template
    assert first.read_bytes() == reference.read_bytes()
    assert second.read_bytes() == reference.read_bytes()
    info = json.loads(
        subprocess.run(
            [qemu_img, "info", "--output=json", str(second)], capture_output=True, check=True
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", size)
    assert "backing-filename" not in info
    subprocess.run([qemu_img, "check", "-q", str(second)], check=True)
    assert stat.S_IMODE(os.stat(second).st_mode) == 0o600


async def test_an_existing_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    path.write_bytes(b"x" * (4 << 20))
    await scratch_image.create(str(path), 64 << 20)
    await scratch_image.create(str(tmp_path / "t.qcow2"), 64 << 20)
    assert path.read_bytes() == (tmp_path / "t.qcow2").read_bytes()


async def test_begins_at_once_share_one_qemu_img(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []
    make = scratch_image._make

    async def counted(size: int) -> bytes:
        made.append(size)
        return await make(size)

    monkeypatch.setattr(scratch_image, "_make", counted)
    paths = [tmp_path / f"{i}.qcow2" for i in range(4)]
    await asyncio.gather(
        scratch_image.prepare(GiB), *(scratch_image.create(str(p), GiB) for p in paths)
    )
    assert made == [GiB]
    assert len({p.read_bytes() for p in paths}) == 1


async def test_a_failing_qemu_img_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QEMUError, match="cannot create a scratch image of -1 bytes"):
        await scratch_image.create(str(tmp_path / "s.qcow2"), -1)
    assert not (tmp_path / "s.qcow2").exists()


def test_a_template_left_unmade_by_a_gone_event_loop_is_not_waited_for(tmp_path: Path) -> None:
    gone = asyncio.new_event_loop()
    scratch_image._making[GiB] = gone.create_future()  # never finished
    gone.close()
    try:
        path = tmp_path / "s.qcow2"
        asyncio.run(asyncio.wait_for(scratch_image.create(str(path), GiB), 60))
        assert path.read_bytes()[:4] == b"QFI\xfb"
    finally:
        scratch_image._making.pop(GiB, None)
