"""The test guest with its data disk on an NBD export (nbdsrv's ``restore/ID``), attached as
docs/restore.md tells users to boot a VM from a restore:

    -blockdev driver=nbd,server.type=unix,server.path=nbd.sock,export=restore/ID,node-name=data
    -device virtio-blk-pci,drive=data,id=vdisk0          → the guest's /dev/vda, on /data
"""

from __future__ import annotations

from pathlib import Path

from tests.guest.build import Guest
from tests.guest.vm import DISK_ID, GuestVM

VIRTIO_BACKEND = f"/machine/peripheral/{DISK_ID}/virtio-backend"


class NBDDiskGuestVM(GuestVM):
    def __init__(self, workdir: Path, guest: Guest, socket: str, export: str) -> None:
        super().__init__(workdir, guest)
        self.socket = socket
        self.export = export

    def disk_argv(self) -> list[str]:
        return [
            "-blockdev", f"driver=nbd,server.type=unix,server.path={self.socket},"
                         f"export={self.export},node-name=data",
            "-device", f"virtio-blk-pci,drive=data,id={DISK_ID}",
        ]  # fmt: skip

    def start(self) -> None:
        self.launch()
        self.wait_booted()

    def disk_reads(self) -> int:
        """How many reads the guest's disk device has issued so far (QEMU's blockstats)."""
        assert self.qmp is not None
        for entry in self.qmp.cmd("query-blockstats"):
            if entry.get("qdev") == VIRTIO_BACKEND:
                return int(entry["stats"]["rd_operations"])
        raise AssertionError(f"no blockstats for {VIRTIO_BACKEND}")
