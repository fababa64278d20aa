"""Empty scratch qcow2 images for copy-before-write, written from a template in memory.

``qemu-img create`` of a session's scratch image was a third of ``backup begin`` (a fork and
exec of qemu-img, ~25 ms here). An empty qcow2 with no backing file depends on nothing but
its virtual size (no time stamp, no UUID: two runs give the same bytes), so qemu-img makes
it once per size, into a private temporary directory, and every later image of that size
is those bytes written to the new file (~200 KiB for 10 GiB, ~450 KiB for 16 TiB).

qemu-img stays the only thing that knows the qcow2 format: nbdsrv never builds or changes a
header itself. A daemon prepares the sizes of a VM's disks when it connects to the VM
(:func:`prepare`), so even its first session pays no qemu-img.
"""

import asyncio
import collections
import os
import tempfile

from ..private_files import write_whole
from .errors import QEMUError

# Sizes kept (least recently used goes first): a template is at most ~1 MiB up to 64 TiB.
MAX_TEMPLATES = 16

_templates: collections.OrderedDict[int, bytes] = collections.OrderedDict()
_making: dict[int, asyncio.Future[bytes]] = {}


async def create(path: str, size: int) -> None:
    """An empty qcow2 of ``size`` bytes at ``path`` (mode 0600, replacing any file there),
    with no backing: the copy-before-write filter reads unchanged data from the disk."""
    data = await _template(size)
    try:
        write_whole(path, data)
    except OSError as e:
        raise QEMUError(f"cannot create scratch image {path}: {e.strerror or e}") from e


async def prepare(size: int) -> None:
    """Make the template of ``size`` now, so that a later :func:`create` is only a write."""
    await _template(size)


async def _template(size: int) -> bytes:
    data = _templates.get(size)
    if data is not None:
        _templates.move_to_end(size)
        return data
    making = _making.get(size)
    # One qemu-img per size, however many begins (or prepares) ask at once; one left by an
    # event loop that has gone (tests run several in turn) is not waited for.
    if making is None or making.get_loop() is not asyncio.get_running_loop():
        making = asyncio.ensure_future(_make(size))
        _making[size] = making
        making.add_done_callback(_made)
    data = await asyncio.shield(making)
    _templates[size] = data
    _templates.move_to_end(size)
    while len(_templates) > MAX_TEMPLATES:
        _templates.popitem(last=False)
    return data


def _made(done: asyncio.Future[bytes]) -> None:
    for size, making in list(_making.items()):
        if making is done:
            del _making[size]


async def _make(size: int) -> bytes:
    with tempfile.TemporaryDirectory(prefix="nbdsrv-scratch-") as directory:
        path = os.path.join(directory, "empty.qcow2")
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", path, str(size),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip()
            raise QEMUError(f"cannot create a scratch image of {size} bytes: {detail}")
        with open(path, "rb") as f:
            return f.read()
