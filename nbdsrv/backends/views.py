"""What a VM backend shows: `status`'s entry of a VM and `checkpoint list`'s entries.

These are the JSON documents of the control protocol (docs/reference.md, docs/api.md) as
types: a backend builds them, daemon.py passes them on, text_output.py reads them. Their
keys and their order are the protocol; a field is added here and in docs/reference.md.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class CheckpointInfo(TypedDict):
    """One checkpoint as `checkpoint list` shows it."""

    name: str
    parent: str | None
    created: str
    granularity: NotRequired[int]
    """Bytes per bit of its dirty bitmaps (a libvirt domain does not show it)."""
    disks: list[str]
    valid: bool
    reason: str | None
    """Why it cannot be used (None when valid)."""
    persistent: bool
    """False when some disk keeps its bitmap in QEMU's memory only."""


class BlockJobInfo(TypedDict):
    """A block job of QEMU as `status` shows it (the progress of a snapshot commit)."""

    device: str | None
    type: str | None
    offset: int | None
    len: int | None
    ready: bool | None


class QmpVMStatus(TypedDict):
    """`status`'s entry of a `--qmp` or `--image` VM."""

    name: str
    qmp: str
    qmp_connected: bool
    responsive: bool
    live_socket: str | None
    guest_agent: str | None
    guest_agent_connected: bool
    guest_frozen: NotRequired[bool]
    """A guest nbdsrv froze (--quiesce) is not confirmed thawed yet."""
    error: str | None
    disks: list[str]
    jobs: list[BlockJobInfo]
    checkpoints: list[str]


class LibvirtVMStatus(TypedDict):
    """`status`'s entry of a libvirt domain."""

    name: str
    backend: Literal["libvirt"]
    libvirt: str
    connected: bool
    error: str | None
    guest_frozen: NotRequired[bool]
    disks: list[str]
    checkpoints: list[str]


class UnansweredVMStatus(TypedDict):
    """`status`'s entry of a VM whose backend could not describe it in time (daemon.py)."""

    name: str
    connected: bool
    guest_frozen: bool
    error: str
    disks: list[str]
    checkpoints: list[str]


VMStatus = QmpVMStatus | LibvirtVMStatus | UnansweredVMStatus
