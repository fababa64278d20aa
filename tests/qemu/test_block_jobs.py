"""Waiting for block jobs and exports by their events, against a real qemu-storage-daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdsrv.qemu.block_exports import wait_export_deleted
from nbdsrv.qemu.block_jobs import wait_job_gone, wait_job_ready
from nbdsrv.qemu.errors import QEMUError
from nbdsrv.qemu.storage_daemon import StorageDaemon

from .conftest import make_image, qemu_io


async def start_mirror(qsd: StorageDaemon, target: Path, job: str, speed: int = 0) -> None:
    """A mirror of disk0 into a fresh image: it becomes ready once the first copy is done
    (with `speed` in bytes per second, 0: unlimited)."""
    make_image(target, "qcow2")
    await qsd.monitor.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "target",
            "file": {"driver": "file", "filename": str(target)},
        },
    )
    await qsd.monitor.execute(
        "blockdev-mirror",
        # The job starts at the root: the throttle node the live export sits on.
        {"job-id": job, "device": "disk0-live", "target": "target", "sync": "full", "speed": speed},
    )


async def test_a_mirror_is_ready_then_gone_after_cancel(qsd: StorageDaemon, tmp_path: Path) -> None:
    await start_mirror(qsd, tmp_path / "target.qcow2", "m0")
    await wait_job_ready(qsd.monitor, "m0", timeout=60)
    [info] = await qsd.monitor.execute("query-block-jobs")
    assert (info["device"], info["ready"]) == ("m0", True)
    await qsd.monitor.execute("block-job-cancel", {"device": "m0"})
    await wait_job_gone(qsd.monitor, "m0", timeout=60)
    assert await qsd.monitor.execute("query-block-jobs") == []


async def test_waiting_for_a_job_that_is_not_there(qsd: StorageDaemon) -> None:
    with pytest.raises(QEMUError, match=r"^block job nope ended before it was ready$"):
        await wait_job_ready(qsd.monitor, "nope")
    await wait_job_gone(qsd.monitor, "nope")


async def test_a_job_not_ready_in_time_is_a_clear_error(qsd: StorageDaemon, tmp_path: Path) -> None:
    # A megabyte of data to copy at one byte per second: never ready within the test.
    await qemu_io(qsd.live_uri("disk0"), "write -P 0x5a 0 1M")
    await start_mirror(qsd, tmp_path / "target.qcow2", "m1", speed=1)
    try:
        with pytest.raises(QEMUError, match=r"^block job m1 not ready after 0\.3s$"):
            await wait_job_ready(qsd.monitor, "m1", timeout=0.3)
    finally:
        await qsd.monitor.execute("block-job-cancel", {"device": "m1", "force": True})
        await wait_job_gone(qsd.monitor, "m1", timeout=60)


async def test_a_deleted_export_is_waited_for(qsd: StorageDaemon) -> None:
    await qsd.monitor.execute("block-export-del", {"id": "disk1"})
    await wait_export_deleted(qsd.monitor, "disk1")
    exports = await qsd.monitor.execute("query-block-exports")
    assert [e["id"] for e in exports] == ["disk0"]
    await wait_export_deleted(qsd.monitor, "disk1")  # already gone: returns at once
