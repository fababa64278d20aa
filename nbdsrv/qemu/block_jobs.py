"""Block jobs and image files for snapshots: overlays, waiting for jobs, nodes of a file."""

import asyncio

from .errors import QEMUError
from .monitor import Monitor

JOB_TIMEOUT = 600.0


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


async def _job(monitor: Monitor, job: str) -> dict[str, object] | None:
    for info in await monitor.execute("query-block-jobs"):
        if info.get("device") == job:
            return dict(info)
    return None


async def wait_job_ready(monitor: Monitor, job: str, timeout: float = JOB_TIMEOUT) -> None:
    """Until the job reports ready (an active commit's first copy is done)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await _job(monitor, job)
        if info is None:
            raise QEMUError(f"block job {job} ended before it was ready")
        if info.get("ready"):
            return
        if info.get("io-status") not in (None, "ok"):
            raise QEMUError(f"block job {job}: I/O status {info.get('io-status')}")
        if loop.time() > deadline:
            raise QEMUError(f"block job {job} not ready after {timeout:g}s")
        await asyncio.sleep(0.05)


async def wait_job_gone(monitor: Monitor, job: str, timeout: float = JOB_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await _job(monitor, job) is not None:
        if loop.time() > deadline:
            raise QEMUError(f"block job {job} still running after {timeout:g}s")
        await asyncio.sleep(0.05)


async def nodes_of_file(monitor: Monitor, filename: str) -> list[str]:
    """Format nodes (then their file nodes) that open ``filename``."""
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    matching = [n for n in nodes if n.get("file") == filename]
    matching.sort(key=lambda n: n.get("drv") == "file")
    return [str(n["node-name"]) for n in matching]
