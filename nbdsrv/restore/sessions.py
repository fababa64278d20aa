"""Restore sessions: a writable ``restore/ID`` export into an image, optionally fed from a
live-restore source while it is already in use.

begin::

    input checked (one sentence for each refusal; nothing created)
      ─►  record "opening"  ─►  nbdsrv's private qemu-storage-daemon (started on demand)
      ─►  [source nbd node; size checked]  ─►  [image created]  ─►  image nodes (QEMU's lock)
      ─►  writable QEMU export  ─►  [block-stream]  ─►  restore/ID on every listener
      ─►  record "open"

A failure on the way undoes every step (an image begin created is removed). end removes
``restore/ID`` (its clients get ESHUTDOWN), QEMU's export, the job and the nodes — closing
the image flushes it — and the private QSD once no session needs it: afterwards no QEMU of
nbdsrv's holds the image. A session still copying from its source is ended only with
``abort``.

The copy's state is read from QEMU at each of QEMU's events about the job, and every
WATCH_INTERVAL (into_disk.py): ``streaming`` while the job runs, ``source unreachable`` while
it stands stopped on a read error (it is resumed every RESUME_INTERVAL: QEMU's nbd client reconnects
on the next request), ``ready`` once it has completed and QEMU dropped the backing link,
``failed`` if it ended with an error.
"""

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..backup.crash_points import crash_point
from ..errors import NbdsrvError, NotFoundError
from ..exports.catalog import ExportCatalog
from ..exports.restore import RestoreExport
from ..net.address import Address
from ..qemu.errors import QEMUError
from ..qemu.images import detect_format, one_line
from ..qemu.monitor import Monitor
from ..qemu.storage_daemon import StorageDaemon
from .errors import RestoreError
from .into_disk import (
    STREAM,
    DiskLiveRestore,
    check_overlay_directory,
    follow_stream,
    overlay_path,
    remove_overlay,
)
from .libvirt_disk import LibvirtDisks
from .prefetch import Prefetch
from .records import RestoreRecord, RestoreRecords
from .source import Source, TLSFiles, parse_source
from .states import FAILED, READY, STREAMING, UNREACHABLE, WRITABLE
from .target import (
    TargetNodes,
    add_tls_creds,
    cancel_job,
    close_nodes,
    create_image,
    export_writable,
    node_size,
    open_image,
    open_source,
    qemu_words,
    remove_export,
    start_stream,
)

if TYPE_CHECKING:
    from ..backends.embedded import EmbeddedVM
    from ..registry import VMRegistry

log = logging.getLogger(__name__)
audit = logging.getLogger("nbdsrv.audit")

FORMATS = ("qcow2", "raw")
EXPORT_PREFIX = "restore/"

# Tries to open a session again while a dying QEMU still holds the image's lock.
LOCK_RETRIES = 20


@dataclass
class RestoreSession:
    record: RestoreRecord
    nodes: TargetNodes
    monitor: Monitor | None  # None: a session that could not be opened again
    export: RestoreExport | None
    state: str
    error: str | None = None
    streamed_bytes: int = 0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    live: DiskLiveRestore | None = field(default=None, repr=False)  # --source into a disk
    prefetch: Prefetch | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def export_name(self) -> str:
        return EXPORT_PREFIX + self.record.id


@dataclass(frozen=True)
class BeginRestore:
    image: str | None = None
    size: int | None = None
    format: str | None = None
    source: str | None = None
    vm: str | None = None
    disk: str | None = None


class RestoreSessions:
    """Every restore session of the daemon."""

    def __init__(
        self,
        catalog: ExportCatalog,
        addresses: list[Address],
        state_dir: str,
        *,
        tls_files: TLSFiles | None = None,
        qemu_img: str = "qemu-img",
        stream_speed: int = 0,
        vms: "VMRegistry | None" = None,
        libvirt: LibvirtDisks | None = None,
    ) -> None:
        self.catalog = catalog
        self.addresses = addresses
        self.state_dir = state_dir
        self.tls_files = tls_files
        self.qemu_img = qemu_img
        # Bytes a second the background copy may take from the source (0: no limit).
        self.stream_speed = stream_speed
        self.vms = vms
        self.libvirt = libvirt or LibvirtDisks([])
        self.records = RestoreRecords(state_dir)
        self.sessions: dict[str, RestoreSession] = {}
        self._qsd: StorageDaemon | None = None
        self._lock = asyncio.Lock()

    # -- the private qemu-storage-daemon ------------------------------------------------------

    @property
    def _qsd_dir(self) -> str:
        return os.path.join(self.state_dir, "restore")

    async def _storage_daemon(self) -> StorageDaemon:
        if self._qsd is None:
            self._qsd = StorageDaemon("qsd", [], self._qsd_dir, empty=True)
        qsd = self._qsd
        if not qsd.running:
            qsd.on_exit = self._qsd_exited
            await qsd.start()
        return qsd

    def _qsd_exited(self, returncode: int, tail: str) -> None:
        last = one_line(tail) or "no message"
        for session in self.sessions.values():
            if session.state != FAILED:
                session.state = FAILED
                session.error = f"nbdsrv's qemu-storage-daemon went away: {last}"
            self._drop_export(session)

    async def _stop_idle_daemon(self) -> None:
        if self._qsd is not None and not self.sessions:
            qsd, self._qsd = self._qsd, None
            with contextlib.suppress(QEMUError):
                await qsd.stop()

    # -- start and stop of the daemon ---------------------------------------------------------

    async def start(self) -> None:
        """Finish or clean up what a killed daemon left, and open again the sessions that
        were running (a live restore's copy goes on)."""
        for record in self.records.all():
            if record.step == "opening":
                log.warning("restore %s: begin was interrupted; cleaning up", record.id)
                if record.created_image:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(record.image)
                remove_overlay(record.overlay)
                self.records.remove(record.id)
            elif record.step == "ending":
                remove_overlay(record.overlay)
                self.records.remove(record.id)
            else:
                try:
                    await self._open_again(record)
                    log.info("restore %s: opened again after a restart", record.id)
                except NbdsrvError as e:
                    log.error("restore %s cannot be opened again: %s", record.id, e)
                    self.sessions[record.id] = RestoreSession(
                        record, TargetNodes.of(record.id), None, None, FAILED, str(e)
                    )

    async def _open_again(self, record: RestoreRecord) -> None:
        """Open a running session again; the QEMU of a killed daemon may still be closing
        the image (it got SIGTERM when the daemon died), so QEMU's lock gets a moment."""
        for attempt in range(LOCK_RETRIES):
            try:
                await self._open(record, resumed=True)
                return
            except RestoreError as e:
                if "lock" not in str(e) or attempt == LOCK_RETRIES - 1:
                    raise
            await asyncio.sleep(0.5)

    async def shutdown(self) -> None:
        """Daemon stop: exports go, QEMU closes the images; records stay, so the next start
        opens the sessions again."""
        for session in list(self.sessions.values()):
            await self._stop_watching(session)
            if session.export is not None:
                self._drop_export(session)
                await session.export.aclose()
        self.sessions.clear()
        await self._stop_idle_daemon()

    # -- operations ---------------------------------------------------------------------------

    async def begin(self, request: BeginRestore) -> dict[str, Any]:
        async with self._lock:
            record = await self._checked(request)
            self.records.write(record)
            try:
                session = await self._open(record, resumed=False)
            except BaseException:
                self.records.remove(record.id)
                await self._stop_idle_daemon()
                raise
        audit.info(
            "restore begun: id=%s image=%s source=%s", record.id, record.image, record.source
        )
        return self.describe(session)

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(session) for session in self.sessions.values()]

    async def end(self, session_id: str, *, abort: bool = False) -> dict[str, Any]:
        async with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise NotFoundError(f"no restore session '{session_id}'")
            if session.state in (STREAMING, UNREACHABLE) and not abort:
                raise RestoreError(
                    f"restore {session_id} is still copying from its source "
                    f"({session.state}); wait until it is ready, or end it with --abort"
                )
            self.records.write(replace(session.record, step="ending"))
            described = self.describe(session)
            await self._stop_watching(session)
            if session.export is not None:
                self._drop_export(session)
                await session.export.aclose()
            if session.monitor is not None and session.monitor.connected:
                record = session.record
                if session.live is not None and session.live.step is not None:
                    await session.live.abort()
                if record.vm is not None and record.disk is not None and record.libvirt is None:
                    await remove_export(session.monitor, session.nodes.export)
                    await self._embedded(record.vm).open_live_export(record.disk)
                else:
                    await self._close_target(session.monitor, session.nodes)
            remove_overlay(session.record.overlay)
            del self.sessions[session_id]
            self.records.remove(session_id)
            await self._stop_idle_daemon()
        audit.info("restore ended: id=%s abort=%s", session_id, abort)
        return {**described, "ended": True}

    def describe(self, session: RestoreSession) -> dict[str, Any]:
        record = session.record
        export = session.export
        name = session.export_name
        return {
            "id": record.id,
            "image": record.image,
            "vm": record.vm,
            "disk": record.disk,
            "format": record.format,
            "size": record.size,
            "export": name,
            "uri": self.addresses[0].uri(name) if self.addresses else None,
            "uris": [address.uri(name) for address in self.addresses],
            "source": record.source,
            "state": session.state,
            "error": session.error,
            "written_bytes": export.written_bytes if export is not None else 0,
            "streamed_bytes": session.streamed_bytes,
            "step": _live_step(record),
            "mirrored_bytes": _mirrored_bytes(session),
        }

    # -- begin --------------------------------------------------------------------------------

    async def _checked(self, request: BeginRestore) -> RestoreRecord:
        """The record of a session ``request`` asks for; RestoreError for bad input."""
        if request.vm is not None and self._is_libvirt(request.vm):
            return await self._checked_libvirt_disk(request)
        if request.vm is not None or request.disk is not None:
            return self._checked_disk(request)
        if not request.image:
            raise RestoreError("restore begin needs --image PATH (or VM --disk DISK)")
        image = os.path.abspath(request.image)
        if request.format is not None and request.format not in FORMATS:
            raise RestoreError(f"--format {request.format}: use qcow2 or raw")
        if request.size is not None and request.size <= 0:
            raise RestoreError("--size must be a positive number of bytes")
        source: Source | None = None
        if request.source is not None:
            source = parse_source(request.source)
            if source.tls:
                self._tls_directory()  # refuses now when there are no certificates
        for other in self.sessions.values():
            if os.path.realpath(other.record.image) == os.path.realpath(image):
                raise RestoreError(f"{image} is being restored already (restore {other.id})")
        exists = os.path.exists(image)
        if exists:
            if os.path.isdir(image):
                raise RestoreError(f"{image} is a directory")
            fmt = request.format or await detect_format(image, self.qemu_img)
        else:
            if not os.path.isdir(os.path.dirname(image)):
                raise RestoreError(f"cannot create {image}: no directory {os.path.dirname(image)}")
            if request.size is None and source is None:
                raise RestoreError(f"{image} does not exist: give --size to create it")
            fmt = request.format or "qcow2"
        if source is not None and fmt != "qcow2":
            raise RestoreError(
                "--source needs a qcow2 target: a raw image cannot have the source as backing"
            )
        return RestoreRecord(
            id=secrets.token_hex(4),
            image=image,
            format=fmt,
            size=request.size or 0,
            step="opening",
            created_image=not exists,
            source=request.source,
        )

    def _checked_disk(self, request: BeginRestore) -> RestoreRecord:
        if request.vm is None or request.disk is None:
            raise RestoreError("restore into a VM's disk needs both VM and --disk DISK")
        if request.image is not None:
            raise RestoreError("give --image PATH or VM --disk DISK, not both")
        if request.size is not None or request.format is not None:
            raise RestoreError("--size and --format are for a new image, not a VM's disk")
        if request.source is not None and parse_source(request.source).tls:
            self._tls_directory()  # refuses now when there are no certificates
        image = self._embedded(request.vm).restore_image(request.disk)
        return self._disk_record(request, str(image.path), image.format)

    def _disk_record(
        self, request: BeginRestore, image: str, fmt: str, libvirt: str | None = None
    ) -> RestoreRecord:
        """The record of a restore into the disk whose image is ``image`` (with --source, its
        overlay beside it); refused when that image is being restored already."""
        self._not_restored_already(image)
        session_id = secrets.token_hex(4)
        overlay = None
        if request.source is not None:
            check_overlay_directory(image)
            overlay = overlay_path(image, session_id)
        return RestoreRecord(
            id=session_id,
            image=image,
            format=fmt,
            size=0,
            step="opening",
            created_image=False,
            vm=request.vm,
            disk=request.disk,
            libvirt=libvirt,
            source=request.source,
            overlay=overlay,
            live_step=STREAM if overlay is not None else None,
        )

    def _is_libvirt(self, name: str) -> bool:
        """A VM that only libvirt can tell about: a running domain nbdsrv follows, or any
        name not in the registry while the daemon follows a libvirt connection."""
        from ..backends.libvirt.vm import LibvirtVM

        vm = self.vms.vms.get(name) if self.vms is not None else None
        return isinstance(vm, LibvirtVM) or (vm is None and self.libvirt.offered)

    async def _checked_libvirt_disk(self, request: BeginRestore) -> RestoreRecord:
        if request.disk is None:
            raise RestoreError("restore into a VM's disk needs both VM and --disk DISK")
        if request.image is not None or request.size is not None or request.format is not None:
            raise RestoreError("--image, --size and --format are not for a libvirt domain's disk")
        if request.source is not None and parse_source(request.source).tls:
            self._tls_directory()  # refuses now when there are no certificates
        assert request.vm is not None
        disk = await self.libvirt.resolve(request.vm, request.disk)
        return self._disk_record(request, disk.path, disk.format, libvirt=disk.uri)

    def _not_restored_already(self, image: str) -> None:
        for other in self.sessions.values():
            if os.path.realpath(other.record.image) == os.path.realpath(image):
                raise RestoreError(f"{image} is being restored already (restore {other.id})")

    def _embedded(self, name: str) -> "EmbeddedVM":
        from ..backends.embedded import EmbeddedVM

        if self.vms is None:
            raise NotFoundError(f"no VM named '{name}'")
        vm = self.vms.get(name)
        if not isinstance(vm, EmbeddedVM):
            raise RestoreError(
                f"restore into a disk is offered for VMs of --image (nbdsrv's own "
                f"qemu-storage-daemon) and libvirt domains that are shut off; VM {name} is "
                "neither: restore into an image instead"
            )
        return vm

    async def _open_disk(self, record: RestoreRecord, *, resumed: bool) -> RestoreSession:
        """A disk of an embedded VM: its live export is taken away (refused while a writer is
        connected) and the restore export sits on the same live node, in the same QSD (with
        --source: on a temporary overlay until it is copied into that node, into_disk.py)."""
        assert record.vm is not None and record.disk is not None
        vm = self._embedded(record.vm)
        disk = record.disk
        monitor = vm.monitor
        nodes = TargetNodes.of(record.id)
        image = vm.restore_image(disk)
        if vm.live_socket is None:
            raise RestoreError(f"VM {vm.name} is not running")
        async with vm.lock:
            await vm.close_live_export(disk)
            address = Address("unix", path=vm.live_socket)
            export: RestoreExport | None = None
            try:
                if record.live_step is not None:
                    session = await self._serve_live_into_disk(
                        record, monitor, image.live_node, address, resumed=resumed
                    )
                else:
                    size = await node_size(monitor, image.live_node)
                    await export_writable(monitor, image.live_node, nodes.export)
                    record = replace(record, size=size, step="open")
                    session = RestoreSession(record, nodes, monitor, None, _settled(record))
                    export = RestoreExport(session.export_name, size, address, nodes.export)
                    self.catalog.add(export)
                    session.export = export
                    self.records.write(record)
            except BaseException as e:
                if export is not None and self.catalog.find_export(export.name) is export:
                    self.catalog.remove(export.name)
                with contextlib.suppress(QEMUError):
                    await remove_export(monitor, nodes.export)
                with contextlib.suppress(QEMUError):
                    await vm.open_live_export(disk)
                if isinstance(e, QEMUError):
                    raise RestoreError(qemu_words(e)) from e
                raise
        self._adopt(session)
        return session

    async def _serve_live_into_disk(
        self,
        record: RestoreRecord,
        monitor: Monitor,
        disk_node: str,
        address: Address,
        *,
        resumed: bool,
    ) -> RestoreSession:
        """The steps of into_disk.py into ``disk_node`` and ``restore/ID`` on ``address``;
        what this opened is undone on failure (the disk node stays)."""
        size = await node_size(monitor, disk_node)
        live = self._live_into_disk(record, monitor, disk_node, size, address)
        await live.open(new=not resumed)
        export: RestoreExport | None = None
        try:
            if live.step is None:
                record = replace(record, live_step=None, ready=True)
            record = replace(record, size=size, step="open")
            state = STREAMING if live.step is not None else _settled(record)
            nodes = TargetNodes.of(record.id)
            session = RestoreSession(record, nodes, monitor, None, state, live=live)
            if record.ready:
                session.streamed_bytes = size
            export = RestoreExport(session.export_name, size, address, session.nodes.export)
            self.catalog.add(export)
            session.export = export
            self.records.write(record)
        except BaseException:
            if export is not None and self.catalog.find_export(export.name) is export:
                self.catalog.remove(export.name)
            with contextlib.suppress(QEMUError):
                await (live.close() if resumed else live.abort())
            raise
        return session

    def _adopt(self, session: RestoreSession) -> None:
        """A session now open: listed, and its copy followed."""
        self.sessions[session.id] = session
        live = session.live
        if live is not None and live.step is not None:
            session.watcher = asyncio.create_task(
                self._run_live(session, live), name=f"restore-live {session.id}"
            )

    def _live_into_disk(
        self, record: RestoreRecord, monitor: Monitor, disk_node: str, size: int, address: Address
    ) -> DiskLiveRestore:
        assert record.source is not None and record.overlay is not None
        assert record.live_step is not None
        return DiskLiveRestore(
            monitor,
            TargetNodes.of(record.id),
            disk_node,
            record.overlay,
            size,
            parse_source(record.source),
            step=record.live_step,
            tls_directory=self._tls_directory,
            speed=self.stream_speed,
            qemu_img=self.qemu_img,
            prefetch_address=address,
        )

    async def _run_live(self, session: RestoreSession, live: DiskLiveRestore) -> None:
        def report(state: str, streamed_bytes: int, error: str | None) -> None:
            session.state, session.streamed_bytes, session.error = state, streamed_bytes, error
            if error:
                log.error("restore %s: %s", session.id, error)

        def save_step(step: str | None) -> None:
            session.record = replace(session.record, live_step=step, ready=step is None)
            self.records.write(session.record)

        await live.run(report, save_step)

    async def _open(self, record: RestoreRecord, *, resumed: bool) -> RestoreSession:
        """QEMU's side and the export of ``record`` (a new session, or one opened again after
        a restart); everything undone on failure."""
        if record.vm is not None and record.libvirt is None:
            return await self._open_disk(record, resumed=resumed)
        if record.live_step is not None:
            return await self._open_libvirt_live(record, resumed=resumed)
        qsd = await self._storage_daemon()
        monitor = qsd.monitor
        nodes = TargetNodes.of(record.id)
        streaming = record.source is not None and not record.ready
        export: RestoreExport | None = None
        created = False
        try:
            backing = None
            source_size = None
            if streaming:
                assert record.source is not None
                source = parse_source(record.source)
                creds = None
                if source.tls:
                    await add_tls_creds(monitor, nodes, self._tls_directory())
                    creds = nodes.tls_creds
                source_size = await open_source(monitor, source.blockdev(nodes.source, creds))
                if record.size and record.size != source_size:
                    raise RestoreError(
                        f"the source is {source_size} bytes, but --size says {record.size}"
                    )
                backing = nodes.source
            if not os.path.exists(record.image):
                if resumed:
                    raise RestoreError(f"{record.image} is gone")
                await create_image(
                    record.image, record.format, record.size or source_size or 0, self.qemu_img
                )
                created = True
                crash_point("restore-image-created")
            try:
                await open_image(
                    monitor,
                    nodes,
                    record.image,
                    record.format,
                    backing,
                    header_backing=record.libvirt is not None,
                )
            except QEMUError as e:
                raise RestoreError(f"cannot open {record.image}: {qemu_words(e)}") from e
            size = await node_size(monitor, nodes.image)
            if source_size is not None and size != source_size:
                raise RestoreError(
                    f"{record.image} is {size} bytes but the source is {source_size}: "
                    "a restore target must be the source's size"
                )
            if record.size and size != record.size:
                raise RestoreError(f"{record.image} is {size} bytes, not --size {record.size}")
            await export_writable(monitor, nodes.image, nodes.export)
            if streaming:
                await start_stream(monitor, nodes, self.stream_speed)
            record = replace(record, size=size, step="open")
            session = RestoreSession(
                record, nodes, monitor, None, STREAMING if streaming else _settled(record)
            )
            export = RestoreExport(
                session.export_name, size, Address("unix", path=str(qsd.live_socket)), nodes.export
            )
            self.catalog.add(export)
            session.export = export
            crash_point("restore-before-open-record")
            self.records.write(record)
        except BaseException as e:
            if export is not None and self.catalog.find_export(export.name) is export:
                self.catalog.remove(export.name)
            with contextlib.suppress(QEMUError):
                await self._close_target(monitor, nodes)
            if (created or (record.created_image and not resumed)) and os.path.exists(record.image):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record.image)
            if isinstance(e, QEMUError):
                raise RestoreError(qemu_words(e)) from e
            raise
        if record.ready and record.source is not None:
            session.streamed_bytes = size
        self.sessions[record.id] = session
        if streaming:
            if not self.stream_speed:  # a speed limit is block-stream's alone
                qsd_socket = Address("unix", path=str(qsd.live_socket))
                prefetch = Prefetch(monitor, nodes.image, qsd_socket, nodes.prefetch, size)
                if await prefetch.start():
                    session.prefetch = prefetch
            session.watcher = asyncio.create_task(
                self._watch(session), name=f"restore-watch {record.id}"
            )
        return session

    async def _open_libvirt_live(self, record: RestoreRecord, *, resumed: bool) -> RestoreSession:
        """A live restore into a shut-off libvirt domain's disk: the disk's image opened in
        nbdsrv's own QSD (with its header's backing chain and its bitmaps) is the target of
        into_disk.py's steps; the export sits on the overlay until the pivot."""
        qsd = await self._storage_daemon()
        monitor = qsd.monitor
        nodes = TargetNodes.of(record.id)
        try:
            try:
                await open_image(
                    monitor, nodes, record.image, record.format, None, header_backing=True
                )
            except QEMUError as e:
                raise RestoreError(f"cannot open {record.image}: {qemu_words(e)}") from e
            address = Address("unix", path=str(qsd.live_socket))
            session = await self._serve_live_into_disk(
                record, monitor, nodes.image, address, resumed=resumed
            )
        except BaseException as e:
            with contextlib.suppress(QEMUError):
                await self._close_target(monitor, nodes)
            if isinstance(e, QEMUError):
                raise RestoreError(qemu_words(e)) from e
            raise
        self._adopt(session)
        return session

    def _tls_directory(self) -> str:
        """A directory with the daemon's certificates under the names QEMU wants."""
        files = self.tls_files
        if files is None or files.ca is None:
            raise RestoreError(
                "nbds:// needs the daemon's TLS settings (--tls-cert, --tls-key and --tls-ca, "
                "whose CA verifies the source)"
            )
        directory = os.path.join(self._qsd_dir, "tls")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name, path in (
            ("client-cert.pem", files.cert),
            ("client-key.pem", files.key),
            ("ca-cert.pem", files.ca),
        ):
            link = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.symlink(os.path.abspath(path), link)
        return directory

    # -- end ----------------------------------------------------------------------------------

    def _drop_export(self, session: RestoreSession) -> None:
        export = session.export
        if export is not None and self.catalog.find_export(export.name) is export:
            self.catalog.remove(export.name)

    async def _close_target(self, monitor: Monitor, nodes: TargetNodes) -> None:
        await cancel_job(monitor, nodes.job)
        await remove_export(monitor, nodes.export)
        await close_nodes(monitor, nodes)

    async def _stop_watching(self, session: RestoreSession) -> None:
        prefetch, session.prefetch = session.prefetch, None
        if prefetch is not None:
            await prefetch.stop()
        watcher, session.watcher = session.watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    # -- the copy from the source ----------------------------------------------------------------

    async def _watch(self, session: RestoreSession) -> None:
        """Follow the copy (progress, a stopped job resumed while the source is away) until
        it ends."""
        monitor, job = session.monitor, session.nodes.job
        assert monitor is not None

        def report(state: str, copied: int) -> None:
            session.streamed_bytes = max(session.streamed_bytes, copied)
            session.state = state

        info = await follow_stream(monitor, job, lambda: session.prefetch, report)
        await self._copy_ended(session, info)

    async def _copy_ended(self, session: RestoreSession, info: dict[str, Any] | None) -> None:
        monitor, nodes = session.monitor, session.nodes
        assert monitor is not None
        prefetch, session.prefetch = session.prefetch, None
        if prefetch is not None:
            await prefetch.stop()
        error = info.get("error") if info is not None else None
        if info is None:
            error = "the copy job disappeared"
        with contextlib.suppress(QEMUError):
            await monitor.execute("job-dismiss", {"id": nodes.job})
        if error:
            session.state = FAILED
            session.error = f"copy from the source failed: {error}"
            log.error("restore %s: %s", session.id, session.error)
            return
        # QEMU dropped the backing link (and rewrote the header): the source can go.
        with contextlib.suppress(QEMUError):
            await monitor.execute("blockdev-del", {"node-name": nodes.source})
        with contextlib.suppress(QEMUError):
            await monitor.execute("object-del", {"id": nodes.tls_creds})
        session.record = replace(session.record, ready=True)
        self.records.write(session.record)
        session.streamed_bytes = session.record.size
        session.state = READY
        log.info("restore %s: copy from the source complete", session.id)


def stream_speed_from_environment() -> int:
    """NBDSRV_RESTORE_SPEED: bytes a second a live restore's copy may take (0: no limit)."""
    text = os.environ.get("NBDSRV_RESTORE_SPEED", "0")
    try:
        value = int(text)
    except ValueError:
        raise RestoreError(f"NBDSRV_RESTORE_SPEED={text!r} is not a number of bytes") from None
    if value < 0:
        raise RestoreError("NBDSRV_RESTORE_SPEED must not be negative")
    return value


def _live_step(record: RestoreRecord) -> str | None:
    """The copy a live restore is at: ``stream`` (from the source), into a disk then
    ``mirror`` and ``pivot`` (into_disk.py); None when no copy is left (or none was asked)."""
    if record.overlay is not None:
        return record.live_step
    if record.source is not None and not record.ready:
        return STREAM
    return None


def _mirrored_bytes(session: RestoreSession) -> int | None:
    """Bytes of the disk the copy from the overlay has passed (a live restore into a disk)."""
    record = session.record
    if record.overlay is None:
        return None
    if session.live is not None:
        return session.live.mirrored_bytes
    return record.size if record.ready else 0


def _settled(record: RestoreRecord) -> str:
    """The state of a session with no copy under way."""
    return READY if record.source is not None else WRITABLE
