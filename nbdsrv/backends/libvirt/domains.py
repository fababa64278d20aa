"""``--libvirt URI``: every running domain of the connection with a qcow2 disk is a VM.

Domains are followed through libvirt's lifecycle events and, after every (re)connection, a
full listing; events are handled one at a time, in order, by one task::

    started / resumed   ──►  VM added (unless a VM of that name comes from elsewhere)
    stopped / crashed   ──►  its sessions fail (EIO); the VM goes once none holds it
    job completed       ──►  a session whose job nbdsrv did not end fails
    libvirtd restart    ──►  reconnect, list again, check the jobs of running sessions
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ...errors import NbdsrvError
from ...registry import VMRegistry
from .connection import DomainEvent, LibvirtConnection, LibvirtError
from .vm import LibvirtVM
from .xmldesc import domain_disks

log = logging.getLogger(__name__)


class LibvirtDomains:
    """The VMs of one libvirt connection, kept in the daemon's registry."""

    def __init__(self, uri: str, registry: VMRegistry, state_dir: str, scratch_dir: str) -> None:
        self.uri = uri
        self.registry = registry
        self.state_dir = state_dir
        self.scratch_dir = scratch_dir
        self.connection = LibvirtConnection(uri, self._event, self._connected)
        self.libvirt = self.connection.libvirt
        self.vms: dict[str, LibvirtVM] = {}
        self._queue: asyncio.Queue[DomainEvent | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        # Listings after a (re)connection and events must not adopt the same domain twice.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._work())
        await self.connection.start()

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for vm in list(self.vms.values()):
            self._release(vm)
        await self.connection.stop()

    # -- following libvirt ------------------------------------------------------------------

    def _event(self, event: DomainEvent) -> None:
        self._queue.put_nowait(event)

    async def _connected(self) -> None:
        """(Re)connected: take the running domains as they are now."""
        async with self._lock:
            running = await self.connection.call(self._running_domains)
            for name, vm in list(self.vms.items()):
                if name not in running:
                    vm.domain_stopped("the domain stopped while libvirtd was away")
                else:
                    await vm.reconnected()
            for name in running:
                await self._adopt(name)

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            try:
                async with self._lock:
                    await self._handle(event)
            except NbdsrvError as e:
                log.warning("libvirt %s: domain %s: %s", self.uri, event.domain, e)

    async def _handle(self, event: DomainEvent) -> None:
        libvirt = self.libvirt
        vm = self.vms.get(event.domain)
        if event.kind == "job-completed":
            # Domain jobs are also migrations, dumps, …: only backup jobs matter here.
            operation = event.params.get("operation", libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)
            if vm is not None and operation == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
                await vm.job_completed(event.params)
        elif event.event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            await self._adopt(event.domain)
        elif (
            event.event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED)
            and vm is not None
            and vm.running
        ):
            vm.domain_stopped(f"domain {event.domain} stopped")

    async def _adopt(self, name: str) -> None:
        known = self.vms.get(name)
        if known is not None and known.running:
            return
        if known is not None:
            # Restarted while a session still holds the old run: the new run is a new VM.
            self._release(known)
        if name in self.registry.vms:
            log.warning("libvirt %s: domain %s not added: a VM of that name exists", self.uri, name)
            return
        try:
            disks = await self.connection.call(self._disks, name)
        except LibvirtError as e:
            log.info("libvirt %s: domain %s: %s", self.uri, name, e)
            return
        if not any(d.can_checkpoint for d in disks):
            log.info("libvirt %s: domain %s has no qcow2 disk; not a VM for nbdsrv", self.uri, name)
            return
        vm = LibvirtVM(name, self.connection, self.state_dir, self.scratch_dir, self._release)
        self.vms[name] = vm
        await self.registry.add(vm)
        log.info("libvirt %s: VM %s (disks %s)", self.uri, name, ", ".join(d.target for d in disks))

    def _release(self, vm: LibvirtVM) -> None:
        if self.vms.get(vm.name) is vm:
            del self.vms[vm.name]
        if self.registry.vms.get(vm.name) is vm:
            del self.registry.vms[vm.name]
            log.info("libvirt %s: VM %s dropped", self.uri, vm.name)

    # -- blocking parts -----------------------------------------------------------------------

    def _running_domains(self) -> list[str]:
        conn: Any = self.connection.conn
        return [
            str(dom.name())
            for dom in conn.listAllDomains(self.libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        ]

    def _disks(self, name: str) -> list[Any]:
        return domain_disks(self.connection.conn.lookupByName(name).XMLDesc(0))
