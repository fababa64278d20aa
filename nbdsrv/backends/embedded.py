"""The embedded default: a qemu-storage-daemon that nbdsrv starts, owns and stops.

``nbdsrv serve disk.qcow2`` (``--image VM=PATH,...``): the images are opened by a private
QSD (qemu/storage_daemon.py) whose live disks are writable NBD exports on
``<state-dir>/VM.live.sock``; everything else is a QMP-driven VM like any other.
"""

import os

from ..backup.store import VMStore
from ..errors import NotFoundError
from ..qemu.block_exports import wait_export_deleted
from ..qemu.errors import QEMUError, QMPError
from ..qemu.storage_daemon import Image, StorageDaemon, describe_status
from ..restore.errors import RestoreError
from .qmp.vm import QmpVM


class EmbeddedVM(QmpVM):
    """A :class:`QmpVM` whose QEMU is nbdsrv's own qemu-storage-daemon."""

    def __init__(self, name: str, images: list[str], state_dir: str, scratch_dir: str) -> None:
        store = VMStore(state_dir, name)
        # After snapshots the disks continue in overlays: open the chain from its top.
        tops = store.load_checkpoints().get("tops", {})
        images = [
            tops[f"disk{i}"] if os.path.exists(tops.get(f"disk{i}", "")) else path
            for i, path in enumerate(images)
        ]
        self.storage_daemon = StorageDaemon(name, images, state_dir)
        super().__init__(name, self.storage_daemon.monitor, store, scratch_dir)

    async def start(self) -> None:
        qsd = self.storage_daemon

        def exited(returncode: int, tail: str) -> None:
            last = tail.strip().splitlines()[-1] if tail.strip() else "no message"
            self.lost(f"qemu-storage-daemon {describe_status(returncode)}: {last}")

        qsd.on_exit = exited
        self._watch()
        await qsd.start()
        self.roots = list(qsd.disks)
        self.live_socket = self.nbd_socket = str(qsd.live_socket)
        await self._reconcile()

    async def stop(self) -> None:
        await self._cancel_tasks()
        try:
            await self.storage_daemon.stop()
        except QEMUError as e:
            self.failure = str(e)
            raise
        finally:
            await self.monitor.close()

    # -- restore into a disk (nbdsrv/restore/sessions.py) -----------------------------------

    def restore_image(self, disk: str) -> Image:
        """``disk``'s image; a restore writes through its live node, where the writers'
        path is, so the recording bitmap sees every block the restore writes."""
        for image in self.storage_daemon.images:
            if image.node == disk:
                return image
        raise NotFoundError(f"VM {self.name} has no disk '{disk}'")

    async def close_live_export(self, disk: str) -> None:
        """Take the disk's live export away for a restore. Refused while a writer is
        connected: QEMU's safe mode removes no export that is in use."""
        image = self.restore_image(disk)
        try:
            await self.monitor.execute("block-export-del", {"id": image.node})
        except QMPError as e:
            raise RestoreError(
                f"VM {self.name}'s disk {disk} has a writer connected to its live export "
                f"({e.desc.splitlines()[0] if e.desc else e}); disconnect it first"
            ) from None
        await wait_export_deleted(self.monitor, image.node)

    async def open_live_export(self, disk: str) -> None:
        """Give the disk's live export back (a restore into it ended)."""
        image = self.restore_image(disk)
        await self.monitor.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": image.node,
                "node-name": image.live_node,
                "name": image.node,
                "writable": True,
            },
        )
