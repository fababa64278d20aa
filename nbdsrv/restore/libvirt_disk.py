"""Restore into a disk of a libvirt domain that is shut off (``restore begin VM --disk DISK``).

The disk (its target, ``vda``, as nbdsrv names libvirt disks everywhere) is resolved to its
image file and format through libvirt — the domain's XML — and then restored like an
``--image`` restore, in nbdsrv's own qemu-storage-daemon, except that the image is opened
with its backing chain as its header names it::

    libvirt: domain shut off? disk vda → /var/lib/libvirt/images/vm1.qcow2 (qcow2)
      ─►  QSD: blockdev-add qcow2 (backing from the header) over file (QEMU's image lock)
              the qcow2's persistent bitmaps (libvirt's checkpoints) are loaded; the enabled
              ones record every block the restore writes
      ─►  restore end: blockdev-del — QEMU stores the bitmaps in the image and lets it go

While the session runs, QEMU's image lock keeps the domain from starting (``virsh start``
fails on the "write" lock). A running or paused domain is refused here, and a domain started
between this check and the open loses the race to the lock one way or the other: either
begin fails on the lock, or the domain does not start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.libvirt.xmldesc import domain_disks
from ..errors import NotFoundError
from .errors import RestoreError

if TYPE_CHECKING:
    from ..backends.libvirt.domains import LibvirtDomains

FORMATS = ("qcow2", "raw")

# virDomainState values (libvirt-domain.h), named as libvirt's virsh names them.
STATE_NAMES = {
    0: "in no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "suspended (pmsuspended)",
}
SHUTOFF = 5


@dataclass(frozen=True)
class LibvirtDisk:
    """The image of a shut-off domain's disk, as libvirt's XML names it."""

    uri: str
    domain: str
    target: str
    path: str
    format: str


class LibvirtDisks:
    """The disks of the daemon's libvirt connections (``--libvirt URI``), for restores."""

    def __init__(self, connections: list[LibvirtDomains]) -> None:
        # The daemon's own list: connections are added to it when the daemon starts.
        self.connections = connections

    @property
    def offered(self) -> bool:
        return bool(self.connections)

    async def resolve(self, vm: str, target: str) -> LibvirtDisk:
        """The image of disk ``target`` of domain ``vm``; RestoreError when it cannot be
        restored into (a running domain, an unknown disk, an image nbdsrv cannot open)."""
        for domains in self.connections:
            found: tuple[int, str] | None = await domains.connection.call(
                _state_and_xml, domains.connection, vm
            )
            if found is not None:
                state, xml = found
                return _disk_of(domains.uri, vm, target, state, xml)
        raise NotFoundError(f"no VM named '{vm}'")


def _state_and_xml(connection: Any, name: str) -> tuple[int, str] | None:
    """The domain's state and XML (for a shut-off domain: its persistent definition); None
    when the connection has no domain of that name. Runs in the connection's threads."""
    libvirt = connection.libvirt
    try:
        dom = connection.conn.lookupByName(name)
        state = int(dom.state()[0])
        return state, str(dom.XMLDesc(0))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _disk_of(uri: str, vm: str, target: str, state: int, xml: str) -> LibvirtDisk:
    if state != SHUTOFF:
        words = STATE_NAMES.get(state, f"in state {state}")
        raise RestoreError(
            f"VM {vm} is a libvirt domain that is {words}: restore into its disk only while "
            "it is shut off"
        )
    disks = domain_disks(xml)
    disk = next((d for d in disks if d.target == target), None)
    if disk is None:
        names = ", ".join(d.target for d in disks) or "none"
        raise RestoreError(f"VM {vm} has no disk '{target}' (its disks: {names})")
    where = f"disk {target} of VM {vm}"
    if disk.kind != "file":
        raise RestoreError(
            f"{where} is a {disk.kind} disk: restore into a disk is offered for image files "
            "(qcow2 or raw) only; restore into that storage with its own tools"
        )
    if disk.source is None:
        raise RestoreError(f"{where} has no image (an empty drive)")
    if disk.format not in FORMATS:
        named = (
            f"a {disk.format} image"
            if disk.format
            else "an image whose format libvirt's XML does not name"
        )
        raise RestoreError(f"{where} is {named}: restore into a disk takes qcow2 or raw")
    if not os.path.isfile(disk.source):
        raise RestoreError(f"{where}: its image {disk.source} does not exist")
    return LibvirtDisk(uri, vm, target, os.path.abspath(disk.source), disk.format)
