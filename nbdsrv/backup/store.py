"""Crash-safe metadata in the state directory.

Every write is atomic: a temporary file in the same directory, fsync, rename over the old
name, fsync of the directory. A reader therefore sees the old document or the new one, never
a mix, whatever instant the process dies at.

Per VM (``<state-dir>/vms/<VM>/``):
- ``checkpoints.json`` — the committed chain, and ``last_op``: the id of the last operation it
  includes (the commit record).
- ``intent.json`` — present only while an operation on QEMU is under way: what it is about to
  do, written *before* the QMP transaction. At start-up an intent whose id differs from
  ``last_op`` is finished or rolled back by looking at what QEMU holds.
"""

import contextlib
import json
import os
from typing import Any

FORMAT_VERSION = 1


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, document: Any) -> None:
    write_atomic(path, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")


def read_json(path: str) -> Any | None:
    """The document at ``path``, or None when there is none."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def remove_durably(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))


class VMStore:
    """The files of one VM under the state directory."""

    def __init__(self, state_dir: str, vm: str) -> None:
        self.directory = os.path.join(state_dir, "vms", vm)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.checkpoints_path = os.path.join(self.directory, "checkpoints.json")
        self.intent_path = os.path.join(self.directory, "intent.json")

    def load_checkpoints(self) -> dict[str, Any]:
        document = read_json(self.checkpoints_path)
        if document is None:
            return {"version": FORMAT_VERSION, "last_op": None, "checkpoints": []}
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.checkpoints_path}: unknown format version {document.get('version')}"
            )
        return dict(document)

    def save_checkpoints(self, document: dict[str, Any]) -> None:
        write_json(self.checkpoints_path, {**document, "version": FORMAT_VERSION})

    def write_intent(self, intent: dict[str, Any]) -> None:
        write_json(self.intent_path, intent)

    def read_intent(self) -> dict[str, Any] | None:
        intent = read_json(self.intent_path)
        return dict(intent) if intent is not None else None

    def clear_intent(self) -> None:
        remove_durably(self.intent_path)

    # -- backup sessions: one record per session, written before QEMU is touched --------------

    @property
    def sessions_dir(self) -> str:
        return os.path.join(self.directory, "sessions")

    def write_session(self, session_id: str, record: dict[str, Any]) -> None:
        os.makedirs(self.sessions_dir, mode=0o700, exist_ok=True)
        write_json(os.path.join(self.sessions_dir, f"{session_id}.json"), record)

    def remove_session(self, session_id: str) -> None:
        remove_durably(os.path.join(self.sessions_dir, f"{session_id}.json"))

    def session_records(self) -> list[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.sessions_dir))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if name.endswith(".json"):
                record = read_json(os.path.join(self.sessions_dir, name))
                if record is not None:
                    records.append(dict(record))
        return records
