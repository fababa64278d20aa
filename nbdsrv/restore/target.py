"""A restore target in QEMU: the nodes over the image, its writable export, the copy job.

For an image (``restore begin --image PATH``), in nbdsrv's own qemu-storage-daemon::

    source (nbd, read-only, reconnect-delay)  "rs-ID-src"     only with --source
        ▲ backing
    image (qcow2 | raw)  "rs-ID"  ── writable NBD export "rs-ID" on the QSD's private socket
        │ file
    file "rs-ID-file"  (QEMU's image lock: an image another QEMU holds is refused here)

With a source, ``block-stream`` (job "rs-ID-stream", ``on-error=stop``) pulls every block not
yet written locally into the image; when it completes QEMU drops the backing link and the
image stands alone. A stopped job is resumed (``block-job-resume``) once the source is back.

Node names are at most 31 characters in QEMU: "rs-" + an 8-character id + "-stream".
"""

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..qemu.block_exports import wait_export_deleted
from ..qemu.errors import QEMUError
from ..qemu.images import one_line
from ..qemu.monitor import Monitor
from .errors import RestoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetNodes:
    """QEMU names of one restore session's nodes, export and job."""

    image: str
    file: str
    source: str
    job: str
    export: str
    tls_creds: str
    prefetch: str  # the read-only export of the copy's prefetch (restore/prefetch.py)

    @classmethod
    def of(cls, session_id: str) -> "TargetNodes":
        base = f"rs-{session_id}"
        return cls(
            base, f"{base}-file", f"{base}-src", f"{base}-stream", base, f"{base}-tls", f"{base}-pf"
        )


def qemu_words(error: QEMUError) -> str:
    """QEMU's reason in one line, without the command name in front."""
    text = one_line(str(error))
    _, sep, rest = text.partition(" failed: ")
    return rest if sep else text


async def node_size(monitor: Monitor, node: str) -> int:
    """The virtual size of a named node."""
    for info in await monitor.execute("query-named-block-nodes", {"flat": True}):
        if info.get("node-name") == node:
            return int(info["image"]["virtual-size"])
    raise RestoreError(f"node {node} is not in QEMU")


async def create_image(path: str, fmt: str, size: int, qemu_img: str = "qemu-img") -> None:
    """A new empty image (qcow2: no backing link; a live restore's source is attached over
    QMP, never written into the header)."""
    proc = await asyncio.create_subprocess_exec(
        qemu_img,
        "create",
        "-q",
        "-f",
        fmt,
        path,
        str(size),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        text = one_line((err or out).decode(errors="replace")) or f"status {proc.returncode}"
        raise RestoreError(f"cannot create {path}: {text}")


async def add_tls_creds(monitor: Monitor, nodes: TargetNodes, directory: str) -> None:
    await monitor.execute(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": nodes.tls_creds,
            "dir": directory,
            "endpoint": "client",
            "verify-peer": True,
        },
    )


async def open_source(monitor: Monitor, options: dict[str, Any]) -> int:
    """Add the source's nbd node (QEMU connects at once); its size."""
    try:
        await monitor.execute("blockdev-add", options)
    except QEMUError as e:
        raise RestoreError(f"source unreachable: {qemu_words(e)}") from e
    return await node_size(monitor, str(options["node-name"]))


async def open_image(
    monitor: Monitor,
    nodes: TargetNodes,
    path: str,
    fmt: str,
    backing: str | None,
    *,
    header_backing: bool = False,
) -> None:
    """The file node and the format node over it (with ``backing`` for a live restore, or
    with the backing chain the header names when ``header_backing``: a VM's disk)."""
    # discard=unmap: a client's TRIM frees space in the image (QEMU ignores it otherwise).
    await monitor.execute(
        "blockdev-add",
        {"driver": "file", "filename": path, "node-name": nodes.file, "discard": "unmap"},
    )
    options: dict[str, Any] = {
        "driver": fmt,
        "file": nodes.file,
        "node-name": nodes.image,
        "discard": "unmap",
    }
    if fmt == "qcow2" and not header_backing:
        # No backing: the header names none; with a source, the nbd node is the backing.
        options["backing"] = backing
    try:
        await monitor.execute("blockdev-add", options)
    except QEMUError:
        with contextlib.suppress(QEMUError):
            await monitor.execute("blockdev-del", {"node-name": nodes.file})
        raise


async def export_writable(monitor: Monitor, node: str, export: str) -> None:
    await monitor.execute(
        "block-export-add",
        {"type": "nbd", "id": export, "node-name": node, "name": export, "writable": True},
    )


async def start_stream(monitor: Monitor, nodes: TargetNodes, speed: int = 0) -> None:
    await monitor.execute(
        "block-stream",
        {
            "job-id": nodes.job,
            "device": nodes.image,
            "on-error": "stop",
            "auto-dismiss": False,
            "speed": speed,
        },
    )


async def job_info(monitor: Monitor, job: str) -> dict[str, Any] | None:
    for info in await monitor.execute("query-block-jobs"):
        if info.get("device") == job:
            return dict(info)
    return None


async def remove_export(monitor: Monitor, export: str) -> None:
    """Take the export away (its clients are cut off) and wait until QEMU has."""
    with contextlib.suppress(QEMUError):
        await monitor.execute("block-export-del", {"id": export, "mode": "hard"})
    await wait_export_deleted(monitor, export)


async def cancel_job(monitor: Monitor, job: str) -> None:
    """Cancel the copy job (if any) and wait until it is gone."""
    info = await job_info(monitor, job)
    if info is None:
        return
    if info.get("status") != "concluded":
        with contextlib.suppress(QEMUError):
            await monitor.execute("block-job-cancel", {"device": job, "force": True})
        for _ in range(600):
            info = await job_info(monitor, job)
            if info is None or info.get("status") == "concluded":
                break
            await asyncio.sleep(0.05)
    with contextlib.suppress(QEMUError):
        await monitor.execute("job-dismiss", {"id": job})


async def close_nodes(monitor: Monitor, nodes: TargetNodes) -> None:
    """Close the image (QEMU flushes it) and the source; nodes already gone are fine."""
    await remove_export(monitor, nodes.prefetch)  # if a prefetch left it: it holds the image
    for node in (nodes.image, nodes.file, nodes.source):
        with contextlib.suppress(QEMUError):
            await monitor.execute("blockdev-del", {"node-name": node})
    with contextlib.suppress(QEMUError):
        await monitor.execute("object-del", {"id": nodes.tls_creds})


async def names_in_use(monitor: Monitor) -> set[str]:
    """Node names QEMU holds now."""
    names = await monitor.execute("query-named-block-nodes", {"flat": True})
    return {str(info.get("node-name")) for info in names}
