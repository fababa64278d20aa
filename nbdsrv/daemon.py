"""The daemon: exports, listeners and the control socket, from start to clean stop."""

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .backends.base import BeginRequest, VMBackend
from .backends.embedded import EmbeddedVM
from .backends.qmp.vm import QmpVM
from .backends.views import CheckpointInfo, UnansweredVMStatus, VMStatus
from .backup.sessions import SessionError, SessionManager
from .backup.store import VMStore
from .config.remote import RemoteConfig
from .control import ControlServer, control_peer
from .errors import ConfigError, NbdsrvError
from .exports.catalog import ExportCatalog
from .exports.file import FileExport
from .metrics import Labels, Metrics, Sample
from .net.address import Address
from .net.server import NBDServer, ServerPolicy
from .operations import OPERATIONS, PROTOCOL_VERSION
from .qemu.monitor import Monitor
from .registry import VMRegistry
from .remote.server import RemoteControlServer
from .restore.libvirt_disk import LibvirtDisks
from .restore.sessions import BeginRestore, RestoreSessions, stream_speed_from_environment
from .restore.source import TLSFiles

log = logging.getLogger(__name__)
audit = logging.getLogger("nbdsrv.audit")


@dataclass
class DaemonConfig:
    state_dir: str
    control: str
    listen: list[Address]
    files: list[tuple[str, str]] = field(default_factory=list)
    qmp: list[tuple[str, str]] = field(default_factory=list)
    qemu_nbd: dict[str, str] = field(default_factory=dict)
    guest_agents: dict[str, str] = field(default_factory=dict)
    images: list[tuple[str, list[str]]] = field(default_factory=list)
    libvirt: list[str] = field(default_factory=list)
    scratch_dir: str | None = None
    policy: ServerPolicy = field(default_factory=ServerPolicy)
    metrics: Address | None = None
    scratch_limit: int = 0
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    tls_files: TLSFiles | None = None


# The longest `status` waits for one VM: a hung QEMU, libvirtd or guest agent costs only its
# own VM's entry (backends bound their own waits well below it).
VM_STATUS_TIMEOUT = 5.0


async def _describe_vm(vm: VMBackend) -> VMStatus:
    """What status shows for ``vm``; whatever goes wrong there is that entry's error."""
    try:
        async with asyncio.timeout(VM_STATUS_TIMEOUT):
            return await vm.describe()
    except Exception as e:  # one broken VM never fails status for the others
        reason = (
            f"no answer within {VM_STATUS_TIMEOUT:g} s" if isinstance(e, TimeoutError) else str(e)
        )
        log.error("VM %s: status: %s", vm.name, reason)
        return UnansweredVMStatus(
            name=vm.name,
            connected=vm.connected,
            guest_frozen=vm.guest_frozen,
            error=reason,
            disks=[],
            checkpoints=[],
        )


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.catalog = ExportCatalog()
        self.server = NBDServer(self.catalog, config.policy)
        self.scratch_dir = config.scratch_dir or os.path.join(config.state_dir, "scratch")
        self.sessions = SessionManager(self.catalog, self.server.addresses)
        self.vms = VMRegistry()
        self.libvirt: list[Any] = []
        self.restores = RestoreSessions(
            self.catalog,
            self.server.addresses,
            config.state_dir,
            tls_files=config.tls_files,
            stream_speed=stream_speed_from_environment(),
            vms=self.vms,
            libvirt=LibvirtDisks(self.libvirt),
        )
        self.metrics: Metrics | None = None
        if config.metrics is not None:
            self.metrics = Metrics()
            self.metrics.collect = self._gauges
            self.server.on_request = self.metrics.count_request
        handlers = {op.name: getattr(self, op.handler) for op in OPERATIONS}
        self.control = ControlServer(config.control, handlers)
        remote = config.remote
        self.remote: list[RemoteControlServer] = []
        if remote.context is not None and remote.grants is not None and remote.limits:
            self.remote = [
                RemoteControlServer(address, remote.context, remote.grants, handlers, remote.limits)
                for address in remote.addresses
            ]
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
            log.info("stopping")
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def start(self) -> None:
        try:
            os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"cannot use the state directory {self.config.state_dir}: {e.strerror or e}"
            ) from e
        if not os.access(self.config.state_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write to the state directory {self.config.state_dir}")
        for name, path in self.config.files:
            try:
                self.catalog.add(FileExport(name, path))
            except OSError as e:
                raise ConfigError(f"cannot export {path} as '{name}': {e.strerror or e}") from e
            except ValueError as e:
                raise ConfigError(str(e)) from e
        for option, names in (
            ("--qemu-nbd", self.config.qemu_nbd),
            ("--qga", self.config.guest_agents),
        ):
            for vm in names:
                if vm not in dict(self.config.qmp):
                    raise ConfigError(f"{option} names VM '{vm}' that has no --qmp")
        state_dir = self.config.state_dir
        for name, path in self.config.qmp:
            # A QEMU run by someone else; nbdsrv must have the QMP socket to itself.
            qmp_vm = QmpVM(
                name,
                Monitor(path, name=f"vm-{name}"),
                VMStore(state_dir, name),
                self.scratch_dir,
                nbd_socket=self.config.qemu_nbd.get(name),
                guest_agent=self.config.guest_agents.get(name),
            )
            qmp_vm.scratch_limit = self.config.scratch_limit
            await self.vms.add(qmp_vm)
        for name, images in self.config.images:
            embedded = EmbeddedVM(name, images, state_dir, self.scratch_dir)
            embedded.scratch_limit = self.config.scratch_limit
            await self.vms.add(embedded)
        for uri in self.config.libvirt:
            # Imported only here: the libvirt binding is needed only with --libvirt.
            from .backends.libvirt.domains import LibvirtDomains

            domains = LibvirtDomains(uri, self.vms, state_dir, self.scratch_dir)
            self.libvirt.append(domains)
            await domains.start()
        for address in self.config.listen:
            try:
                await self.server.listen(address)
            except OSError as e:
                raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from e
        if self.metrics is not None and self.config.metrics is not None:
            try:
                await self.metrics.listen(self.config.metrics)
            except OSError as e:
                raise ConfigError(
                    f"cannot serve metrics on {self.config.metrics}: {e.strerror or e}"
                ) from e
        # Restore sessions a stopped or killed daemon left: cleaned up, or opened again.
        await self.restores.start()
        for listener in self.remote:
            try:
                await listener.start()
            except OSError as e:
                raise ConfigError(
                    f"cannot serve remote control on {listener.address}: {e.strerror or e}"
                ) from e
        # The control socket comes last: `nbdsrv status` succeeding means ready.
        try:
            await self.control.start()
        except OSError as e:
            raise ConfigError(f"cannot open the control socket: {e.strerror or e}") from e

    async def shutdown(self) -> None:
        for listener in self.remote:
            await listener.stop()
        await self.control.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        for session in self.sessions.sessions.values():
            audit.info("session ended: id=%s vm=%s by=daemon-stop", session.id, session.vm.name)
        await self.sessions.end_all()
        await self.restores.shutdown()
        await self.server.stop()
        self.catalog.close_all()
        await self.vms.stop()
        for domains in self.libvirt:
            await domains.stop()

    async def restore_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        # A libvirt domain that is shut off is in no registry: libvirt tells about it.
        vm = self.vms.vms.get(str(args["vm"])) if args.get("vm") is not None else None
        if vm is not None:
            self._no_session(vm, "restore begin")
        return await self.restores.begin(
            BeginRestore(
                image=args.get("image"),
                size=args.get("size"),
                format=args.get("format"),
                source=args.get("source"),
                vm=args.get("vm"),
                disk=args.get("disk"),
            )
        )

    async def restore_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.restores.list()

    async def restore_end(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.restores.end(str(args["id"]), abort=bool(args.get("abort")))

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        exports = []
        for export in self.catalog.list_exports():
            info = export.describe()
            info["uris"] = [address.uri(export.name) for address in self.server.addresses]
            exports.append(info)
        return {
            "pid": os.getpid(),
            "state_dir": self.config.state_dir,
            "control": self.config.control,
            "listen": [str(address) for address in self.server.addresses],
            "remote": [str(listener.address) for listener in self.remote],
            "exports": exports,
            # All at once: one hung QEMU costs status one short timeout, not one per VM.
            "vms": list(await asyncio.gather(*map(_describe_vm, self.vms.vms.values()))),
            "sessions": [self.sessions.describe(s) for s in self.sessions.sessions.values()],
            "connections": len(self.server.connections),
        }

    async def hello(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "nbdsrv": __version__,
            "operations": [op.name for op in OPERATIONS],
        }

    async def checkpoint_create(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(str(args["vm"]))
        granularity = args.get("granularity")
        checkpoint = await vm.create_checkpoint(
            args.get("name"),
            int(granularity) if granularity is not None else None,
            quiesce=bool(args.get("quiesce")),
        )
        return {
            "name": checkpoint.name,
            "parent": checkpoint.parent,
            "created": checkpoint.created,
            "quiesced": checkpoint.quiesced,
        }

    async def _gauges(self) -> list[tuple[str, str, str, Sample]]:
        """Gauges read at scrape time, from the daemon's own state only."""
        rows: list[tuple[str, str, str, Sample]] = []

        def gauge(name: str, text: str, labels: Labels, value: float) -> None:
            rows.append((name, "gauge", text, (name, labels, value)))

        gauge("nbdsrv_sessions_active", "Backup sessions running.", (), len(self.sessions.sessions))
        gauge(
            "nbdsrv_connections_active", "NBD connections open.", (), len(self.server.connections)
        )
        for vm in self.vms.vms.values():
            gauge(
                "nbdsrv_qmp_connected",
                "1 when the VM's QEMU (QMP or libvirt) is connected.",
                (("vm", vm.name),),
                1 if vm.connected else 0,
            )
            gauge(
                "nbdsrv_guest_frozen",
                "1 while a guest frozen by --quiesce is not confirmed thawed.",
                (("vm", vm.name),),
                1 if vm.guest_frozen else 0,
            )
            # What the daemon knows already: a scrape never waits on a VM lock or QEMU.
            try:
                checkpoints = vm.known_checkpoints()
            except NbdsrvError:
                continue
            for valid in (True, False):
                gauge(
                    "nbdsrv_checkpoints",
                    "Checkpoints per VM, by validity (as last checked).",
                    (("vm", vm.name), ("valid", str(valid).lower())),
                    sum(1 for _, ok in checkpoints if ok is valid),
                )
        return rows

    async def checkpoint_list(self, args: dict[str, Any]) -> list[CheckpointInfo]:
        return await self.vms.get(str(args["vm"])).list_checkpoints()

    async def checkpoint_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(str(args["vm"]))
        await vm.delete_checkpoint(str(args["name"]))
        return {"deleted": args["name"]}

    async def backup_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(str(args["vm"]))
        self._no_restore(vm, "backup begin")
        request = BeginRequest(
            from_checkpoint=args.get("from"),
            checkpoint=args.get("checkpoint"),
            no_checkpoint=bool(args.get("no_checkpoint")),
            all_checkpoints=bool(args.get("all_checkpoints")),
            bitmap_name=args.get("bitmap_name"),
            quiesce=bool(args.get("quiesce")),
        )
        started = time.monotonic()
        try:
            session = await self.sessions.begin(vm, request)
        except Exception as e:
            audit.info(
                "session begin failed: vm=%s by=%s error=%r", vm.name, control_peer.get(), str(e)
            )
            raise
        audit.info(
            "session begun: id=%s vm=%s from=%s checkpoint=%s exports=%s by=%s",
            session.id,
            vm.name,
            request.from_checkpoint or "-",
            session.checkpoint or "-",
            ",".join(export.name for export in session.exports.values()),
            control_peer.get(),
        )
        if self.metrics is not None:
            self.metrics.observe("backup_begin", time.monotonic() - started)
        return self.sessions.describe(session)

    async def backup_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        vm = self.vms.get(str(args["vm"]))
        return [self.sessions.describe(s) for s in self.sessions.sessions.values() if s.vm is vm]

    async def backup_end(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(str(args["vm"]))
        started = time.monotonic()
        await self.sessions.end(vm, str(args["id"]))
        if self.metrics is not None:
            self.metrics.observe("backup_end", time.monotonic() - started)
        audit.info("session ended: id=%s vm=%s by=%s", args["id"], vm.name, control_peer.get())
        return {"ended": args["id"]}

    async def snapshot_create(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(str(args["vm"]))
        self._no_session(vm, "snapshot create")
        self._no_restore(vm, "snapshot create")
        return {"vm": vm.name, "overlays": await vm.snapshot_create(args.get("dir"))}

    async def snapshot_commit(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(str(args["vm"]))
        self._no_session(vm, "snapshot commit")
        self._no_restore(vm, "snapshot commit")
        return {"vm": vm.name, "committed": await vm.snapshot_commit()}

    def _no_session(self, vm: VMBackend, what: str) -> None:
        if self.sessions.has_session(vm):
            raise SessionError(f"{what}: VM {vm.name} has a backup session running; end it first")

    def _no_restore(self, vm: VMBackend, what: str) -> None:
        for restore in self.restores.sessions.values():
            if restore.record.vm == vm.name:
                raise SessionError(
                    f"{what}: a restore into disk {restore.record.disk} of VM {vm.name} is "
                    f"running (restore {restore.id}); end it first"
                )
