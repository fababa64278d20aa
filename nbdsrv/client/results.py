"""The results of the control operations, typed (docs/api.md describes every field).

They are the JSON documents the daemon sends, as TypedDicts: a result is a plain dict, so
fields a newer daemon adds are simply there too.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Hello(TypedDict):
    protocol: int
    """The control protocol version the daemon speaks."""
    nbdsrv: str
    operations: list[str]
    """The operations this client may use."""


class Export(TypedDict):
    name: str
    size: int
    contexts: list[str]
    uris: list[str]


class Checkpoint(TypedDict):
    name: str
    parent: str | None
    created: str
    granularity: int
    disks: list[str]
    valid: bool
    reason: str | None
    persistent: NotRequired[bool]


class CheckpointCreated(TypedDict):
    name: str
    parent: str | None
    created: str
    quiesced: bool


class SessionDisk(TypedDict):
    export: str
    """``VM/DISK``"""
    uri: str | None
    """``nbd://HOST:PORT/VM/DISK`` on the daemon's first listener (``nbds://`` with TLS)."""
    uris: list[str]
    contexts: list[str]
    size: int
    dirty_bytes: dict[str, int]
    bytes_read: int
    clients: int
    direct_uri: NotRequired[str]


# "from" is a Python keyword: the functional form.
Session = TypedDict(
    "Session",
    {
        "id": str,
        "vm": str,
        "checkpoint": str | None,
        "from": str | None,
        "quiesced": bool,
        "started": str,
        "state": str,
        "error": str | None,
        "scratch_bytes": int,
        "disks": dict[str, SessionDisk],
    },
)


class Status(TypedDict):
    pid: int
    state_dir: str
    control: str
    listen: list[str]
    remote: list[str]
    exports: list[Export]
    vms: list[dict[str, Any]]
    """``name``, ``disks``, ``checkpoints`` and the backend's connection state."""
    sessions: list[Session]
    connections: NotRequired[int]
    """Local clients only."""


class CheckpointDeleted(TypedDict):
    deleted: str


class SessionEnded(TypedDict):
    ended: str


class SnapshotCreated(TypedDict):
    vm: str
    overlays: dict[str, str]


class SnapshotCommitted(TypedDict):
    vm: str
    committed: dict[str, str]


class Restore(TypedDict):
    """A restore session (``restore begin``, ``restore list``; docs/restore.md)."""

    id: str
    image: str
    vm: str | None
    disk: str | None
    format: str
    size: int
    export: str
    uri: str | None
    uris: list[str]
    source: str | None
    state: str
    error: str | None
    written_bytes: int
    streamed_bytes: int
    step: str | None
    mirrored_bytes: int | None


class RestoreEnded(Restore):
    ended: bool
