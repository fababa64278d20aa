"""Waiting for block jobs: ready (an active commit's first copy done), gone."""

import asyncio

from .errors import QEMUError
from .monitor import Monitor

JOB_TIMEOUT = 600.0


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
