"""Waiting for block jobs: ready (an active commit's first copy done), gone.

Each wait asks `query-block-jobs` once, then again only when QEMU sends news of the job
(`Monitor.wait_until`, so an event that comes during the query is not missed):
BLOCK_JOB_READY, BLOCK_JOB_ERROR, JOB_STATUS_CHANGE, BLOCK_JOB_COMPLETED or
BLOCK_JOB_CANCELLED. A job's id is its `device` in BLOCK_JOB_* events and its `id` in
JOB_STATUS_CHANGE.
"""

from .errors import EventTimeoutError, QEMUError
from .monitor import EventPredicate, Monitor, QMPEvent

JOB_TIMEOUT = 600.0

_ENDED = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
# A job that stops on an I/O error sends BLOCK_JOB_ERROR, then pauses (a status change).
_READY_NEWS = ("BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "JOB_STATUS_CHANGE", *_ENDED)
_GONE_NEWS = ("JOB_STATUS_CHANGE", *_ENDED)
# With auto-dismiss (the default) a job is removed right after it concludes.
_GONE_STATUSES = ("concluded", "null")


async def _job(monitor: Monitor, job: str) -> dict[str, object] | None:
    for info in await monitor.execute("query-block-jobs"):
        if info.get("device") == job:
            return dict(info)
    return None


def _news_of(job: str, statuses: tuple[str, ...] | None = None) -> EventPredicate:
    """Events about `job`; of JOB_STATUS_CHANGE only those to one of `statuses` (None: any)."""

    def match(event: QMPEvent) -> bool:
        if event.name == "JOB_STATUS_CHANGE":
            return event.data.get("id") == job and (
                statuses is None or event.data.get("status") in statuses
            )
        return event.data.get("device") == job

    return match


async def wait_job_ready(monitor: Monitor, job: str, timeout: float = JOB_TIMEOUT) -> None:
    """Until the job reports ready (an active commit's first copy is done)."""

    async def ready() -> bool:
        info = await _job(monitor, job)
        if info is None:
            raise QEMUError(f"block job {job} ended before it was ready")
        if info.get("ready"):
            return True
        if info.get("io-status") not in (None, "ok"):
            raise QEMUError(f"block job {job}: I/O status {info.get('io-status')}")
        return False

    try:
        await monitor.wait_until(ready, _READY_NEWS, _news_of(job), timeout)
    except EventTimeoutError:
        raise QEMUError(f"block job {job} not ready after {timeout:g}s") from None


async def wait_job_gone(monitor: Monitor, job: str, timeout: float = JOB_TIMEOUT) -> None:
    """Until QEMU no longer lists the job (it completed or was cancelled, and is dismissed)."""

    async def gone() -> bool:
        return await _job(monitor, job) is None

    try:
        await monitor.wait_until(gone, _GONE_NEWS, _news_of(job, _GONE_STATUSES), timeout)
    except EventTimeoutError:
        raise QEMUError(f"block job {job} still running after {timeout:g}s") from None
