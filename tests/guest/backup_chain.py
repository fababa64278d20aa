"""A backup chain on the backup side, built from nbdsrv's exports as a backup tool builds one:
``full.qcow2 ← inc1.qcow2 ← inc2.qcow2 …``

- the full backup: ``qemu-img convert`` of the session's export into a new qcow2;
- each incremental: a new qcow2 overlay of the previous image, into which the extents that
  ``qemu:dirty-bitmap:C`` marks dirty are copied (libnbd reads them from nbdsrv and writes them
  into ``qemu-nbd`` serving the overlay: copy_dirty_to_nbd.py).

The top of the chain reads as the disk at the last backup's point in time; ``serve`` offers it
read-only with ``qemu-nbd -r``, as a backup server offers a point in time for a restore.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.harness.tools import TIMEOUT, require_tool, run, stop_process
from tests.harness.waiting import wait_for

COPY_SCRIPT = Path(__file__).with_name("copy_dirty_to_nbd.py")


def qemu_nbd(*args: str, socket: Path) -> subprocess.Popen[bytes]:
    """``qemu-nbd ARGS -k SOCKET``, once it listens."""
    process = subprocess.Popen(
        [require_tool("qemu-nbd"), *args, "-k", str(socket)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: socket.exists() or process.poll() is not None, f"qemu-nbd on {socket}")
    if process.poll() is not None:
        assert process.stderr is not None
        raise AssertionError(f"qemu-nbd {' '.join(args)}: {process.stderr.read().decode()}")
    return process


class BackupChain:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.images: list[Path] = []

    @property
    def top(self) -> Path:
        return self.images[-1]

    def add_full(self, uri: str) -> None:
        image = self.directory / "full.qcow2"
        run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", uri, str(image)],
            timeout=120)  # fmt: skip
        self.images.append(image)

    def add_incremental(self, uri: str, context: str) -> list[tuple[int, int]]:
        """A new overlay holding the dirty extents of ``context``; returns them."""
        image = self.directory / f"inc{len(self.images)}.qcow2"
        run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2",
             "-F", "qcow2", "-b", str(self.top), str(image)])  # fmt: skip
        socket = self.directory / "overlay.sock"
        # Without -t, qemu-nbd exits (closing the image) once its one client has gone.
        server = qemu_nbd("-f", "qcow2", str(image), socket=socket)
        try:
            out = run(["/usr/bin/python3", str(COPY_SCRIPT), uri, context,
                       f"nbd+unix:///?socket={socket}"], timeout=120)  # fmt: skip
            assert server.wait(TIMEOUT) == 0, "qemu-nbd serving the overlay failed"
        finally:
            if server.poll() is None:
                stop_process(server)
        self.images.append(image)
        return [(int(o), int(n)) for o, n in json.loads(out)]

    def serve(self, socket: Path, export: str) -> subprocess.Popen[bytes]:
        """The top of the chain, read-only (``qemu-nbd -r``), until the caller stops it."""
        return qemu_nbd("-r", "-t", "-f", "qcow2", "-x", export, str(self.top), socket=socket)
