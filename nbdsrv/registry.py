"""Bringing VMs up and down: QMP sockets given with --qmp, private QSDs for --image."""

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .backends.qmp.vm import VM
from .backup.store import VMStore
from .errors import ConfigError, NotFoundError
from .qemu.errors import QEMUError, QEMUUnreachableError
from .qemu.monitor import Monitor
from .qemu.storage_daemon import StorageDaemon, describe_status

log = logging.getLogger(__name__)


class VMRegistry:
    """Every VM of the daemon, by name, with what keeps its QEMU reachable."""

    def __init__(
        self,
        state_dir: str,
        *,
        after_reconcile: Callable[[VM], Awaitable[None]] | None = None,
        on_lost: Callable[[VM, str], None] | None = None,
    ) -> None:
        self.state_dir = state_dir
        # Called after every reconciliation (start-up, QMP back) and when QEMU goes away.
        self.after_reconcile = after_reconcile
        self.on_lost = on_lost
        self.vms: dict[str, VM] = {}
        self._storage_daemons: dict[str, StorageDaemon] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, name: str) -> VM:
        vm = self.vms.get(name)
        if vm is None:
            raise NotFoundError(f"no VM named '{name}'")
        return vm

    def _add(self, vm: VM) -> None:
        if vm.name in self.vms:
            raise ConfigError(f"VM '{vm.name}' given twice")
        self.vms[vm.name] = vm
        vm.monitor.on_reconnect = lambda: self._spawn(self._reconcile(vm))
        vm.monitor.on_disconnect = lambda reason: self._lost(vm, f"QMP connection lost: {reason}")

    def _lost(self, vm: VM, reason: str) -> None:
        vm.failure = reason
        if self.on_lost is not None:
            self.on_lost(vm, reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile(self, vm: VM) -> None:
        try:
            await vm.reconcile()
            if self.after_reconcile is not None:
                await self.after_reconcile(vm)
            vm.failure = None
        except QEMUError as e:
            vm.failure = str(e)
            log.error("VM %s: reconciliation failed: %s", vm.name, e)

    async def add_qmp(self, name: str, path: str, nbd_socket: str | None = None) -> None:
        """A QEMU run by someone else; nbdsrv must have the QMP socket to itself.
        ``nbd_socket``: the unix socket of an NBD server that QEMU already runs."""
        monitor = Monitor(path, name=f"vm-{name}")
        vm = VM(name, monitor, VMStore(self.state_dir, name))
        vm.nbd_socket = nbd_socket
        self._add(vm)
        try:
            await monitor.connect(timeout=5)
        except QEMUUnreachableError as e:
            vm.failure = str(e)
            log.warning("VM %s: %s; retrying in the background", name, e)
            self._spawn(self._connect_later(vm))
            return
        await self._reconcile(vm)

    async def _connect_later(self, vm: VM) -> None:
        while True:
            try:
                await vm.monitor.connect(timeout=3600)
            except QEMUUnreachableError:
                continue
            await self._reconcile(vm)
            return

    async def add_images(self, name: str, images: list[str]) -> None:
        """The embedded default: a private qemu-storage-daemon that opens ``images``."""
        store = VMStore(self.state_dir, name)
        # After snapshots the disks continue in overlays: open the chain from its top.
        tops = store.load_checkpoints().get("tops", {})
        images = [
            tops[f"disk{i}"] if os.path.exists(tops.get(f"disk{i}", "")) else path
            for i, path in enumerate(images)
        ]
        qsd = StorageDaemon(name, images, self.state_dir)
        vm = VM(name, qsd.monitor, store, roots=None)
        self._add(vm)
        self._storage_daemons[name] = qsd

        def exited(returncode: int, tail: str) -> None:
            self._lost(
                vm,
                f"qemu-storage-daemon {describe_status(returncode)}: "
                f"{tail.strip().splitlines()[-1] if tail.strip() else 'no message'}",
            )

        qsd.on_exit = exited
        await qsd.start()
        vm.roots = list(qsd.disks)
        vm.live_socket = vm.nbd_socket = str(qsd.live_socket)
        await self._reconcile(vm)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for name, qsd in self._storage_daemons.items():
            try:
                await qsd.stop()
            except QEMUError as e:
                log.error("VM %s: %s", name, e)
        for vm in self.vms.values():
            await vm.monitor.close()
