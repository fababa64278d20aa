"""Image files nbdsrv makes or inspects with qemu-img: format detection, snapshot overlays;
the blockdev options of scratch images (made by qemu/scratch_image.py)."""

import asyncio
import json
import os
import re
from pathlib import Path

from .errors import ImageError, QEMUError

SUPPORTED_FORMATS = ("qcow2", "raw")


async def detect_format(path: str | os.PathLike[str], qemu_img: str = "qemu-img") -> str:
    """The image format of `path` as `qemu-img info` sees it: "qcow2" or "raw".

    Raises `ImageError` for a missing or unreadable file, or any other format.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} does not exist")
    if not path.is_file() and not path.is_block_device():
        raise ImageError(f"image {path} is not a file or block device")
    try:
        proc = await asyncio.create_subprocess_exec(
            qemu_img,
            "info",
            "--output=json",
            "--",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise ImageError(f"{qemu_img} is not installed (package qemu-utils)") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        detail = one_line(err.decode(errors="replace")) or "qemu-img failed"
        raise ImageError(f"cannot read image {path}: {detail}")
    try:
        fmt = json.loads(out)["format"]
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"cannot read image {path}: qemu-img info gave no format") from None
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"image {path} is in {fmt} format; only qcow2 and raw are supported")
    return str(fmt)


def one_line(text: str) -> str:
    """QEMU's multi-line message as one line, without the "program: " prefixes."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(re.sub(r"^qemu-(img|storage-daemon): ", "", line) for line in lines)


async def create_overlay(path: str, backing: str, backing_format: str) -> None:
    """A qcow2 overlay whose header names its backing image (so QEMU finds the chain again
    after a restart)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing, path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise QEMUError(f"cannot create overlay {path}: {err.decode().strip()}")


def scratch_file(filename: str) -> dict[str, object]:
    """The blockdev options of a scratch image's file. With
    ``NBDSRV_FAULT=scratch-write-error`` every data write into it fails with EIO (QEMU's
    blkdebug driver), so a test can make the fleecing job fail."""
    file: dict[str, object] = {"driver": "file", "filename": filename}
    if os.environ.get("NBDSRV_FAULT") == "scratch-write-error":
        return {
            "driver": "blkdebug",
            "image": file,
            "inject-error": [{"event": "write_aio", "errno": 5}],
        }
    return file
