"""Backing chains and their dirty bitmaps, per disk, as QEMU holds them now.

From `query-block` (which disks there are) and `query-named-block-nodes` with `flat: true`
(every node, with its bitmaps)::

    disk "disk0"   layers, top first
      [0] node disk0       /img/top.qcow2   qcow2  rw  bitmaps c2 (recording), c1
      [1] node #block109   /img/base.qcow2  qcow2  ro  bitmaps c0

Image file names identify layers: node names are made up again at every QEMU start.
The flat node list carries no edges, so a node's backing layer is the format node whose
file name is the node's backing file name. Filters that QEMU puts on top of a disk (the
copy-before-write filter of a running fleecing job, throttle, ...) are skipped: they share
the file name of the node below them.

Which disks: with `roots` given, exactly those (node names or BlockBackend / device names);
otherwise every `query-block` entry with a medium (id: BlockBackend name, else the guest
device's id, else the root node name: never a QOM path, see docs/reference.md "Disk names");
and when there is none (qemu-storage-daemon has no named BlockBackends), the format nodes
named `disk0`, `disk1`, ... that `StorageDaemon` creates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import QEMUError
from .monitor import Monitor, raise_first_error

# Drivers that hold image data in a format of their own (a layer of a chain).
FORMAT_DRIVERS = frozenset(
    {"qcow2", "raw", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels", "luks"}
    | {"bochs", "cloop", "dmg"}
)
# Drivers that open a file or device directly: a disk with no format node on them (a block
# device given to the guest as `-blockdev driver=host_device,...`) is one layer of this kind.
PROTOCOL_DRIVERS = frozenset({"file", "host_device"})
_DISK_NODE = re.compile(r"disk(\d+)")


@dataclass(frozen=True)
class Bitmap:
    """A named dirty bitmap on one node (QEMU's BlockDirtyInfo)."""

    name: str
    granularity: int
    count: int
    """Dirty bytes."""
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool


@dataclass(frozen=True)
class Layer:
    """One image of a backing chain."""

    node_name: str
    filename: str
    """The image file: the layer's stable identity."""
    format: str
    virtual_size: int
    read_only: bool
    bitmaps: tuple[Bitmap, ...] = ()
    persistent_bitmaps: bool = False
    """The image can store bitmaps: qcow2 v3. Raw files, block devices, qcow2 v2 and the
    other formats cannot: bitmaps on them live in QEMU's memory only."""

    def bitmap(self, name: str) -> Bitmap | None:
        """The bitmap called `name` on this layer, if any."""
        for bitmap in self.bitmaps:
            if bitmap.name == name:
                return bitmap
        return None


@dataclass(frozen=True)
class Disk:
    """A disk and its backing chain, top (the layer written now) first."""

    id: str
    layers: tuple[Layer, ...]
    device: str | None = None
    """BlockBackend name from query-block (full QEMU with -drive), if any."""
    qdev: str | None = None
    """qdev id or QOM path from query-block, if any."""

    @property
    def top(self) -> Layer:
        return self.layers[0]


@dataclass(frozen=True)
class BlockState:
    """The three answers every view of QEMU's disks starts from, taken in one round trip."""

    block: Sequence[Mapping[str, Any]]
    """query-block"""
    nodes: Sequence[Mapping[str, Any]]
    """query-named-block-nodes, flat"""
    exports: Sequence[Mapping[str, Any]]
    """query-block-exports"""

    def disks(self, roots: Sequence[str] | None = None) -> list[Disk]:
        return disks_from(self.block, self.nodes, roots, self.exports)

    def chains(self, roots: Sequence[str] | None = None) -> dict[str, tuple[Layer, ...]]:
        """Disk id → layers, top first (the shape nbdsrv.backup.checkpoints calls ChainState)."""
        return {disk.id: disk.layers for disk in self.disks(roots)}

    def bitmap_counts(self, node: str) -> dict[str, int]:
        """Dirty byte counts of the bitmaps on ``node``."""
        for info in self.nodes:
            if info.get("node-name") == node:
                return {
                    b["name"]: int(b["count"]) for b in info.get("dirty-bitmaps", []) if "name" in b
                }
        return {}


# What BlockState is made of: for `Monitor.execute_many`, alone or after other commands.
STATE_QUERIES: tuple[tuple[str, Mapping[str, object] | None], ...] = (
    ("query-block", None),
    ("query-named-block-nodes", {"flat": True}),
    ("query-block-exports", None),
)


def block_state_of(results: Sequence[Any]) -> BlockState:
    """The BlockState from the answers to STATE_QUERIES (the first QMPError raised)."""
    raise_first_error(results)
    block, nodes, exports = results
    return BlockState(block, nodes, exports)


async def query_block_state(monitor: Monitor) -> BlockState:
    """The three queries, sent together (QEMU answers them in order, one after the other)."""
    return block_state_of(await monitor.execute_many(STATE_QUERIES))


async def discover_disks(monitor: Monitor, roots: Sequence[str] | None = None) -> list[Disk]:
    """Every disk (or those in `roots`) with its backing chain, from QEMU now."""
    return (await query_block_state(monitor)).disks(roots)


async def discover_chains(
    monitor: Monitor, roots: Sequence[str] | None = None
) -> dict[str, tuple[Layer, ...]]:
    """Disk id → layers, top first (the shape nbdsrv.backup.checkpoints calls ChainState)."""
    return (await query_block_state(monitor)).chains(roots)


def disks_from(
    block: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    roots: Sequence[str] | None = None,
    exports: Sequence[Mapping[str, Any]] | None = None,
) -> list[Disk]:
    """Disks from the results of `query-block` and `query-named-block-nodes` (flat).

    Raises `QEMUError` for a root that names no node and no device.
    """
    by_name = {str(n["node-name"]): n for n in nodes}
    # A disk named by a node (qemu-storage-daemon has no BlockBackend names) is followed
    # through the export of the same id, which QEMU moves onto each new overlay (and back
    # onto the base after a commit, when the node of that name may be gone).
    moved = {str(e["id"]): str(e["node-name"]) for e in exports or () if "node-name" in e}
    devices: list[tuple[str, str | None, str | None, str]] = []  # id, device, qdev, node
    for entry in block:
        inserted = entry.get("inserted")
        if not inserted:
            continue  # an empty drive
        device = entry.get("device") or None
        qdev = entry.get("qdev") or None
        root_node = str(inserted["node-name"])
        devices.append((device or _device_id(qdev) or root_node, device, qdev, root_node))

    if roots is not None:
        wanted: list[tuple[str, str | None, str | None, str]] = []
        for root in roots:
            if root in by_name or root in moved:
                wanted.append((root, None, None, root))
                continue
            match = [d for d in devices if root in d[:3]]
            if not match:
                raise QEMUError(f"QEMU has no disk or block node named {root}")
            wanted.append((root, match[0][1], match[0][2], match[0][3]))
        devices = wanted
    elif not devices:
        numbered = sorted(
            (int(m.group(1)), name)
            for name in set(by_name) | set(moved)
            if (m := _DISK_NODE.fullmatch(name))
        )
        devices = [(name, None, None, name) for _, name in numbered]

    devices = [
        (ident, device, qdev, moved.get(ident, node) if device is None and qdev is None else node)
        for ident, device, qdev, node in devices
    ]
    disks = []
    for ident, device, qdev, node_name in devices:
        node = _below_filters(by_name[node_name], nodes) if node_name in by_name else None
        if node is None:
            continue
        disks.append(Disk(ident, tuple(_layers(node, nodes)), device, qdev))
    return disks


def _device_id(qdev: str | None) -> str | None:
    """The id of the guest device in `qdev`: query-block gives a plain id (`scsi0-0-0-0`) or,
    for virtio devices, the QOM path of the backend inside the device the user named
    (`/machine/peripheral/vdisk0/virtio-backend`). A device without id (under
    `/machine/peripheral-anon/`) has no name to give."""
    if qdev is None or not qdev.startswith("/"):
        return qdev
    parts = qdev.split("/")
    if len(parts) > 3 and parts[1:3] == ["machine", "peripheral"] and parts[3]:
        return parts[3]
    return None


def _is_format(node: Mapping[str, Any]) -> bool:
    return node.get("drv") in FORMAT_DRIVERS


def _below_filters(
    node: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    """The format node under a filter (which reports its child's file name, or — throttle —
    a `json:` description of its children), or `node`; a file or device node that no format
    node opens is its own layer."""
    if _is_format(node):
        return node
    filename = node.get("file")
    if isinstance(filename, str) and filename.startswith("json:"):
        filename = image_in_json(filename)
    for other in nodes:
        if _is_format(other) and other.get("file") == filename:
            return other
    if node.get("drv") in PROTOCOL_DRIVERS:
        return node
    for other in nodes:
        if other.get("drv") in PROTOCOL_DRIVERS and other.get("file") == filename:
            return other
    return None


def image_in_json(filename: str) -> str | None:
    """The image file of the first format layer in a `json:{...}` file name, following
    `file` children through filters: `json:{"driver": "throttle", "file": {"driver":
    "qcow2", "file": {"driver": "file", "filename": "/img/a.qcow2"}}}` → `/img/a.qcow2`."""
    try:
        options = json.loads(filename[len("json:") :])
    except ValueError:
        return None
    while isinstance(options, dict):
        child = options.get("file")
        if options.get("driver") in FORMAT_DRIVERS:
            if isinstance(child, dict) and isinstance(child.get("filename"), str):
                return str(child["filename"])
            return child if isinstance(child, str) else None
        options = child
    return None


def _backing_names(node: Mapping[str, Any]) -> list[str]:
    image = node.get("image") or {}
    names = [node.get("backing_file"), image.get("full-backing-filename")]
    return [str(n) for n in names if n]


def _layers(top: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> list[Layer]:
    layers = []
    seen: set[str] = set()
    node: Mapping[str, Any] | None = top
    while node is not None and str(node["node-name"]) not in seen:
        seen.add(str(node["node-name"]))
        layers.append(_layer(node))
        node = _backing_of(node, nodes, seen)
    return layers


def _backing_of(
    node: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], seen: set[str]
) -> Mapping[str, Any] | None:
    backing = _backing_names(node)
    if not backing:
        return None
    fmt = (node.get("image") or {}).get("backing-filename-format")
    named = [n for n in nodes if n.get("file") in backing and str(n["node-name"]) not in seen]
    # A format node when there is one, else a device or file with none (its data is raw).
    candidates = [n for n in named if _is_format(n)] or [
        n for n in named if n.get("drv") in PROTOCOL_DRIVERS
    ]
    if fmt:
        candidates.sort(key=lambda n: n.get("drv") != fmt)
    return candidates[0] if candidates else None


def _layer(node: Mapping[str, Any]) -> Layer:
    image = node.get("image") or {}
    bitmaps = tuple(
        Bitmap(
            name=str(b["name"]),
            granularity=int(b["granularity"]),
            count=int(b["count"]),
            recording=bool(b.get("recording", False)),
            persistent=bool(b.get("persistent", False)),
            busy=bool(b.get("busy", False)),
            inconsistent=bool(b.get("inconsistent", False)),
        )
        # Nameless bitmaps belong to block jobs (copy-before-write): not ours to see.
        for b in node.get("dirty-bitmaps") or ()
        if b.get("name")
    )
    return Layer(
        node_name=str(node["node-name"]),
        filename=str(node.get("file") or image.get("filename") or ""),
        format=str(node.get("drv")),
        virtual_size=int(image.get("virtual-size", 0)),
        read_only=bool(node.get("ro", False)),
        bitmaps=bitmaps,
        persistent_bitmaps=_stores_bitmaps(node),
    )


def _stores_bitmaps(node: Mapping[str, Any]) -> bool:
    """qcow2 with compat 1.1 (v3); QEMU says "Cannot store dirty bitmaps in qcow2 v2 files"."""
    if node.get("drv") != "qcow2":
        return False
    specific = (node.get("image") or {}).get("format-specific") or {}
    return (specific.get("data") or {}).get("compat") != "0.10"


async def nodes_of_file(monitor: Monitor, filename: str) -> list[str]:
    """Format nodes (then their file nodes) that open ``filename``."""
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    matching = [n for n in nodes if n.get("file") == filename]
    matching.sort(key=lambda n: n.get("drv") == "file")
    return [str(n["node-name"]) for n in matching]
