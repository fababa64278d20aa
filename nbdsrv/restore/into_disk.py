"""Live restore (``--source URI``) into a disk node that a QEMU already holds.

A disk's own image cannot show the source through: its clusters are allocated, and a qcow2
discard over a backing makes zero clusters, not holes. So the source is pulled into a
temporary qcow2 overlay T first, and T is then mirrored into the disk through QEMU, where
the disk's recording dirty bitmap sees every write. In the QEMU that holds the disk::

    source (nbd, read-only, reconnect-delay)  "rs-ID-src"
        ▲ backing
    T (qcow2) "rs-ID-t"  ── writable export "rs-ID" (restore/ID relays to it)
        │ file "rs-ID-tf": IMAGE.restore-ID.qcow2, beside the disk's image
        ╎ blockdev-mirror "rs-ID-mirror" (sync=full, copy-mode=write-blocking)
        ▼
    the disk node (any node the caller names: an embedded VM's "diskN-live", or a disk
    opened in nbdsrv's own QSD as "rs-ID": T's names do not clash with it)

Steps (``live_step`` of the restore record, written before each one begins):

``stream``  T is exported at once (reads as the source; writes land in T) and
            ``block-stream`` (job "rs-ID-stream", ``on-error=stop``) pulls every block not
            yet in T, as a live restore into an image does, with prefetch.py's parallel
            copy-on-read beside it (stopped when the stream ends). The disk is not touched.
``mirror``  T stands alone; the source's node is gone. ``blockdev-mirror`` copies all of T
            into the disk node; the export's writes go to T and, write-blocking, to the disk.
``pivot``   the mirror converged (READY: with write-blocking every acknowledged write is in
            both) and ``block-job-complete`` was asked: QEMU moves the export from T onto the
            disk node. From here on the disk is the restored one.
``None``    done: T's nodes and file are gone; the export sits on the disk node.

``restore list`` shows the step (``step``) and, from the mirror on, how far the copy into the
disk is (``mirrored_bytes``, from the mirror job at each look); ``state`` stays ``streaming``
until the pivot is done.

A restarted daemon (its QEMU died with it) repeats the step: ``stream`` streams again into T
(blocks already in T are not copied again), ``mirror`` mirrors all of T again, ``pivot`` is
done (the disk holds everything; T is removed).

Why T lives beside the disk's image, not in the state directory: it grows to the disk's
size, and the disk's filesystem is the one sized for disk images (as snapshot overlays are).
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from ..backup.crash_points import crash_point
from ..net.address import Address
from ..qemu.errors import QEMUError, QEMUGoneError
from ..qemu.monitor import Monitor, QMPEvent
from .errors import RestoreError
from .prefetch import Prefetch
from .source import Source
from .states import FAILED, READY, STREAMING, UNREACHABLE
from .target import (
    TargetNodes,
    add_tls_creds,
    cancel_job,
    close_nodes,
    create_image,
    export_writable,
    job_info,
    open_image,
    open_source,
    qemu_words,
    remove_export,
    start_stream,
)

log = logging.getLogger(__name__)

STREAM = "stream"
MIRROR = "mirror"
PIVOT = "pivot"
STEPS = (STREAM, MIRROR, PIVOT)

# Seconds between looks at a job (QEMU's events wake the look earlier).
WATCH_INTERVAL = 0.5
# The mirror's buffer under a speed limit: a quarter second's worth, within one request of
# QEMU's (1 MiB) and QEMU's own default (16 MiB).
MIRROR_BUFFER_MIN = 1 << 20
MIRROR_BUFFER_MAX = 16 << 20
# Seconds between attempts to resume a copy stopped by an unreachable source.
RESUME_INTERVAL = 2.0
JOB_EVENTS = (
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
)

Report = Callable[[str, int, str | None], None]
"""report(state, streamed_bytes, error): the session's state as ``restore list`` shows it."""
SaveStep = Callable[[str | None], None]
"""save_step(step): write the restore record's ``live_step`` (atomically) before it begins."""


def overlay_path(image: str, session_id: str) -> str:
    """Where a live restore into the disk whose image is ``image`` keeps T."""
    return f"{image}.restore-{session_id}.qcow2"


def check_overlay_directory(image: str) -> None:
    """Refuse now (nothing created) when T cannot be created beside ``image``."""
    directory = os.path.dirname(os.path.abspath(image))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RestoreError(
            f"cannot live-restore into {image}: its directory {directory} is not writable "
            "(the temporary overlay of a live restore into a disk goes beside the disk's image)"
        )


def remove_overlay(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class DiskLiveRestore:
    """One live restore into ``disk_node`` of ``monitor``'s QEMU (see the module's text)."""

    def __init__(
        self,
        monitor: Monitor,
        nodes: TargetNodes,
        disk_node: str,
        overlay: str,
        size: int,
        source: Source,
        *,
        step: str,
        tls_directory: Callable[[], str],
        speed: int = 0,
        qemu_img: str = "qemu-img",
        prefetch_address: Address | None = None,
    ) -> None:
        if step not in STEPS:
            raise RestoreError(f"unknown live restore step {step!r}")
        self.monitor = monitor
        # The session's source, job, export and credential names; T's own node names.
        self.nodes = replace(nodes, image=f"{nodes.image}-t", file=f"{nodes.image}-tf")
        self.disk_node = disk_node
        self.overlay = overlay
        self.size = size
        self.source = source
        self.step: str | None = step
        self.tls_directory = tls_directory
        self.speed = speed
        self.qemu_img = qemu_img
        self.mirror_job = f"{nodes.image}-mirror"
        # How far the copy into the disk is, in bytes of the disk (restore list's
        # mirrored_bytes): 0 until the mirror runs, the size once the disk is in sync.
        self.mirrored_bytes = 0
        # Where the QEMU's NBD server listens: the stream gets prefetch.py's parallel
        # copy-on-read there (not with a speed limit, which is block-stream's alone).
        self.prefetch_address = prefetch_address
        self.prefetch: Prefetch | None = None

    # -- opening (begin, or again after a restart) -----------------------------------------------

    async def open(self, *, new: bool) -> None:
        """QEMU's side of the current step, with the export ``nodes.export`` on T (on the disk
        node once the step is ``pivot``, which then counts as done). ``new``: begin (T is
        created; a failure removes it). Everything undone on failure; the disk untouched."""
        created = False
        try:
            if self.step == STREAM:
                created = await self._open_streaming(new)
            elif self.step == MIRROR:
                if not os.path.exists(self.overlay):
                    raise RestoreError(f"the live restore's overlay {self.overlay} is gone")
                await self._open_overlay(backing=None)
                await export_writable(self.monitor, self.nodes.image, self.nodes.export)
                await self._start_mirror()
            else:
                # The pivot was asked: the disk holds every acknowledged write.
                remove_overlay(self.overlay)
                self.step = None
                self.mirrored_bytes = self.size
                await export_writable(self.monitor, self.disk_node, self.nodes.export)
        except BaseException as e:
            with contextlib.suppress(QEMUError):
                await self.close()
            if created:
                remove_overlay(self.overlay)
            if isinstance(e, QEMUError):
                raise RestoreError(qemu_words(e)) from e
            raise

    async def _open_streaming(self, new: bool) -> bool:
        """Source, T over it, T's export, the stream; whether T was created here."""
        creds = None
        if self.source.tls:
            await add_tls_creds(self.monitor, self.nodes, self.tls_directory())
            creds = self.nodes.tls_creds
        options = self.source.blockdev(self.nodes.source, creds)
        source_size = await open_source(self.monitor, options)
        if source_size != self.size:
            raise RestoreError(
                f"the source is {source_size} bytes but the disk is {self.size}: "
                "a live restore's source must be the disk's size"
            )
        created = False
        if not os.path.exists(self.overlay):
            if not new:
                raise RestoreError(f"the live restore's overlay {self.overlay} is gone")
            await create_image(self.overlay, "qcow2", self.size, self.qemu_img)
            created = True
        try:
            await self._open_overlay(backing=self.nodes.source)
            await export_writable(self.monitor, self.nodes.image, self.nodes.export)
            await start_stream(self.monitor, self.nodes, self.speed)
            if self.prefetch_address is not None and not self.speed:
                prefetch = Prefetch(
                    self.monitor, self.nodes.image, self.prefetch_address, self.nodes.prefetch,
                    self.size,
                )  # fmt: skip
                if await prefetch.start():
                    self.prefetch = prefetch
        except BaseException:
            if created:
                remove_overlay(self.overlay)
            raise
        return created

    async def _open_overlay(self, backing: str | None) -> None:
        try:
            await open_image(self.monitor, self.nodes, self.overlay, "qcow2", backing)
        except QEMUError as e:
            raise RestoreError(f"cannot open {self.overlay}: {qemu_words(e)}") from e

    async def _start_mirror(self) -> None:
        # sync=full: blocks the stream left unallocated in T (a source's hole that QEMU did
        # not take for zeroes) read as zeroes and must overwrite the disk too; sync=top would
        # skip them.
        # speed: NBDSRV_RESTORE_SPEED limits this copy too (it is part of the background copy);
        # buf-size: with QEMU's default (16 MiB in flight) the job copies 16 MiB at once and
        # then sleeps off the limit, so a limit gets a buffer of a quarter second's worth.
        # write-blocking: once READY, every acknowledged write is in T and in the disk, so a
        # kill during the pivot loses nothing whichever side QEMU's export was on.
        await self.monitor.execute(
            "blockdev-mirror",
            {
                "job-id": self.mirror_job,
                "device": self.nodes.image,
                "target": self.disk_node,
                "sync": "full",
                "copy-mode": "write-blocking",
                "auto-dismiss": False,
                "speed": self.speed,
                **({"buf-size": mirror_buffer(self.speed)} if self.speed else {}),
            },
        )

    # -- running ---------------------------------------------------------------------------------

    async def run(self, report: Report, save_step: SaveStep) -> None:
        """Follow the steps to the end (or a failure, reported as ``failed``)."""
        if self.step == STREAM:
            if not await self._stream(report):
                return
            save_step(MIRROR)
            self.step = MIRROR
            crash_point("restore-disk-streamed")
            try:
                await self._start_mirror()
            except QEMUError as e:
                report(FAILED, self.size, f"copy into the disk failed: {qemu_words(e)}")
                return
        if self.step == MIRROR:
            report(STREAMING, self.size, None)
            if not await self._mirror(report, save_step):
                return
        report(READY, self.size, None)

    async def _stream(self, report: Report) -> bool:
        info = await follow_stream(
            self.monitor,
            self.nodes.job,
            lambda: self.prefetch,
            lambda state, copied: report(state, copied, None),
        )
        await self._stop_prefetch()
        error = await self._ended(self.nodes.job, info)
        if error:
            report(FAILED, 0, f"copy from the source failed: {error}")
            return False
        # T stands alone: the source (and its credentials) can go.
        with contextlib.suppress(QEMUError):
            await self.monitor.execute("blockdev-del", {"node-name": self.nodes.source})
        with contextlib.suppress(QEMUError):
            await self.monitor.execute("object-del", {"id": self.nodes.tls_creds})
        log.info("%s: source copied into the overlay; mirroring into the disk", self.nodes.image)
        return True

    async def _mirror(self, report: Report, save_step: SaveStep) -> bool:
        async def look(info: dict[str, Any]) -> None:
            self.mirrored_bytes = max(self.mirrored_bytes, mirror_progress(info, self.size))

        info = await follow_job(self.monitor, self.mirror_job, ("ready", "concluded"), look)
        if info is None or info.get("status") != "ready":
            error = await self._ended(self.mirror_job, info) or "it ended before it converged"
            report(FAILED, self.size, f"copy into the disk failed: {error}")
            return False
        self.mirrored_bytes = self.size  # in sync: every block of T is in the disk
        save_step(PIVOT)
        self.step = PIVOT
        crash_point("restore-disk-pivot")
        try:
            await self.monitor.execute("block-job-complete", {"device": self.mirror_job})
        except QEMUError as e:
            report(FAILED, self.size, f"switching onto the disk failed: {qemu_words(e)}")
            return False
        info = await follow_job(self.monitor, self.mirror_job, ("concluded",), None)
        failure = await self._ended(self.mirror_job, info)
        if failure:
            report(FAILED, self.size, f"switching onto the disk failed: {failure}")
            return False
        # The export sits on the disk node now; T is nobody's.
        for node in (self.nodes.image, self.nodes.file):
            try:
                await self.monitor.execute("blockdev-del", {"node-name": node})
            except QEMUError as e:
                log.warning("restore: cannot close %s: %s", node, qemu_words(e))
        remove_overlay(self.overlay)
        save_step(None)
        self.step = None
        log.info("%s: copied into the disk; the export sits on it", self.nodes.image)
        return True

    async def _ended(self, job: str, info: dict[str, Any] | None) -> str | None:
        """Dismiss a concluded job; its error, if any."""
        with contextlib.suppress(QEMUError):
            await self.monitor.execute("job-dismiss", {"id": job})
        if info is None:
            return "the job disappeared"
        error = info.get("error")
        return str(error) if error else None

    # -- abort -------------------------------------------------------------------------------------

    async def abort(self) -> None:
        """Stop wherever it is: the jobs, the export, T's and the source's nodes, T's file.
        The disk is as it was before begin while the step is ``stream``; partly overwritten
        during ``mirror``; the restored disk from ``pivot`` on."""
        await self.close()
        remove_overlay(self.overlay)

    async def _stop_prefetch(self) -> None:
        prefetch, self.prefetch = self.prefetch, None
        if prefetch is not None:
            await prefetch.stop()

    async def close(self) -> None:
        """Take QEMU's side away (jobs, export, T's and the source's nodes); T's file stays."""
        await self._stop_prefetch()
        await cancel_job(self.monitor, self.nodes.job)
        await cancel_job(self.monitor, self.mirror_job)
        await remove_export(self.monitor, self.nodes.export)
        await close_nodes(self.monitor, self.nodes)


def mirror_buffer(speed: int) -> int:
    """blockdev-mirror's buf-size under a limit of ``speed`` bytes a second."""
    return min(MIRROR_BUFFER_MAX, max(MIRROR_BUFFER_MIN, speed // 4))


def mirror_progress(info: dict[str, Any], size: int) -> int:
    """The mirror job's progress (``offset`` of ``len`` in query-block-jobs) in bytes of a
    disk of ``size``. ``len`` is not the disk's size: it grows when writes make copied blocks
    dirty again and by each write the export passes through to the disk (write-blocking)."""
    done, total = int(info.get("offset", 0)), int(info.get("len", 0))
    if total <= 0:
        return 0
    return min(size, size * done // total)


async def follow_stream(
    monitor: Monitor,
    job: str,
    prefetch: Callable[[], Prefetch | None],
    report: Callable[[str, int], None],
) -> dict[str, Any] | None:
    """Follow the copy from a live restore's source (the ``block-stream`` job ``job``) until
    it concludes (follow_job's result). ``report(state, copied)`` at each look: ``streaming``,
    or ``source unreachable`` while the job stands stopped on the source's errors (resumed
    every RESUME_INTERVAL); ``copied`` counts what the prefetch has copied beyond the job's
    offset too, and never goes down."""
    loop = asyncio.get_running_loop()
    last_resume = 0.0
    copied = 0

    async def look(info: dict[str, Any]) -> None:
        nonlocal last_resume, copied
        offset = int(info.get("offset", 0))
        accelerator = prefetch()
        if accelerator is not None:
            offset = accelerator.copied(offset)
        copied = max(copied, offset)
        if info.get("status") == "paused" or info.get("io-status", "ok") != "ok":
            report(UNREACHABLE, copied)
            if loop.time() - last_resume >= RESUME_INTERVAL:
                last_resume = loop.time()
                with contextlib.suppress(QEMUError):
                    await monitor.execute("block-job-resume", {"device": job})
        else:
            report(STREAMING, copied)

    return await follow_job(monitor, job, ("concluded",), look)


async def follow_job(
    monitor: Monitor,
    job: str,
    until: tuple[str, ...],
    look: Callable[[dict[str, Any]], Awaitable[None]] | None,
) -> dict[str, Any] | None:
    """Look at ``job`` at each of QEMU's events about it and every WATCH_INTERVAL until its
    status is one of ``until`` (its last info) or it is gone, QEMU included (None); ``look``
    sees each info before that."""
    news = asyncio.Event()

    def about_the_job(event: QMPEvent) -> None:
        if event.data.get("device") == job or event.data.get("id") == job:
            news.set()

    unsubscribe = monitor.subscribe(JOB_EVENTS, about_the_job)
    try:
        while True:
            news.clear()
            try:
                info = await job_info(monitor, job)
            except QEMUGoneError:
                return None  # the QEMU went away, and its jobs with it
            except QEMUError as e:
                log.warning("cannot look at job %s: %s", job, e)
                info = {}
            if info is None or info.get("status") in until:
                return info
            if info and look is not None:
                await look(info)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), WATCH_INTERVAL)
    finally:
        unsubscribe()
