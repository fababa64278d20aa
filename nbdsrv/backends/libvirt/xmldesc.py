"""The libvirt XML nbdsrv reads and writes: domain disks, checkpoints, pull-mode backups.

Formats: https://libvirt.org/formatdomain.html, formatcheckpoint.html, formatbackup.html.
Every value put into XML goes through ElementTree, so names never need escaping by hand.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a running domain as its live XML describes it."""

    target: str
    """``vda``, ``sdb``: the disk's name in libvirt and in nbdsrv."""
    format: str | None
    """The top image's format (``qcow2``, ``raw``)."""
    source: str | None
    """The top image's file (``type='file'``) or device (``type='block'``)."""
    kind: str
    """``file``, ``block``, ``network``, …"""

    @property
    def can_checkpoint(self) -> bool:
        """libvirt keeps checkpoint bitmaps in qcow2 images only."""
        return self.format == "qcow2" and self.source is not None


@dataclass(frozen=True)
class CheckpointDesc:
    """A libvirt checkpoint as ``getXMLDesc(NO_DOMAIN | SIZE)`` describes it."""

    name: str
    parent: str | None
    created: str
    """ISO 8601, UTC (libvirt keeps whole seconds)."""
    creation_time: int
    bitmaps: dict[str, str]
    """disk target → bitmap name, for the disks the checkpoint covers."""
    sizes: dict[str, int | None]
    """disk target → dirty bytes since the checkpoint; None where libvirt found no usable
    bitmap (it then leaves ``size`` out)."""

    @property
    def broken_disks(self) -> list[str]:
        return sorted(disk for disk, size in self.sizes.items() if size is None)


def domain_disks(xml: str) -> list[DomainDisk]:
    """The ``device='disk'`` disks of a domain, in XML order (CD-ROMs and floppies left out)."""
    disks = []
    for node in ET.fromstring(xml).iterfind("./devices/disk"):
        if node.get("device", "disk") != "disk":
            continue
        target = node.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = node.find("driver")
        source = node.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        disks.append(
            DomainDisk(
                target=target.get("dev", ""),
                format=driver.get("type") if driver is not None else None,
                source=path,
                kind=node.get("type", "file"),
            )
        )
    return disks


def qemu_ids(xml: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as, from the live XML's DAC label (``+64055:+64055``);
    None when libvirt does not relabel (QEMU then runs as libvirtd's user)."""
    for label in ET.fromstring(xml).iterfind("./seclabel[@model='dac']/label"):
        uid, sep, gid = (label.text or "").replace("+", "").partition(":")
        if sep and uid.isdigit() and gid.isdigit():
            return int(uid), int(gid)
    return None


def parse_checkpoint(xml: str) -> CheckpointDesc:
    root = ET.fromstring(xml)
    creation_time = int(root.findtext("creationTime") or 0)
    bitmaps: dict[str, str] = {}
    sizes: dict[str, int | None] = {}
    for disk in root.iterfind("./disks/disk"):
        if disk.get("checkpoint") != "bitmap":
            continue
        target = disk.get("name", "")
        bitmaps[target] = disk.get("bitmap", "")
        size = disk.get("size")
        sizes[target] = int(size) if size is not None else None
    return CheckpointDesc(
        name=root.findtext("name") or "",
        parent=root.findtext("./parent/name"),
        created=datetime.fromtimestamp(creation_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        creation_time=creation_time,
        bitmaps=bitmaps,
        sizes=sizes,
    )


def checkpoint_xml(name: str, disks: list[DomainDisk]) -> str:
    """A new checkpoint: a bitmap (named as the checkpoint) on every qcow2 disk, none on
    disks that cannot hold one (libvirt would refuse the whole checkpoint)."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    nodes = ET.SubElement(root, "disks")
    for disk in disks:
        ET.SubElement(
            nodes,
            "disk",
            {"name": disk.target, "checkpoint": "bitmap" if disk.can_checkpoint else "no"},
        )
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class BackupDisk:
    target: str
    scratch: str
    export: str
    bitmap: str | None
    """``exportbitmap``: the dirty-bitmap context the export offers (incremental only)."""


def backup_xml(
    socket: str, disks: list[BackupDisk], incremental: str | None, skip: list[str]
) -> str:
    """A pull-mode backup on a unix socket. ``skip``: targets left out of the backup. A disk
    without ``bitmap`` in an incremental backup is backed up in full (``backupmode='full'``,
    e.g. a disk added after the checkpoint)."""
    root = ET.Element("domainbackup", {"mode": "pull"})
    if incremental is not None:
        ET.SubElement(root, "incremental").text = incremental
    ET.SubElement(root, "server", {"transport": "unix", "socket": socket})
    nodes = ET.SubElement(root, "disks")
    for disk in disks:
        attrs = {"name": disk.target, "backup": "yes", "type": "file", "exportname": disk.export}
        if disk.bitmap is not None:
            attrs["exportbitmap"] = disk.bitmap
        elif incremental is not None:
            attrs["backupmode"] = "full"
        node = ET.SubElement(nodes, "disk", attrs)
        ET.SubElement(node, "scratch", {"file": disk.scratch})
    for target in skip:
        ET.SubElement(nodes, "disk", {"name": target, "backup": "no"})
    return ET.tostring(root, encoding="unicode")


def backup_socket(xml: str) -> str | None:
    """The unix socket of a running backup job (``backupGetXMLDesc``)."""
    server = ET.fromstring(xml).find("server")
    return server.get("socket") if server is not None else None


def backup_scratch_files(xml: str) -> list[str]:
    return [
        node.get("file", "")
        for node in ET.fromstring(xml).iterfind("./disks/disk/scratch")
        if node.get("file")
    ]
