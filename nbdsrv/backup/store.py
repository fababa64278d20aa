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
- ``counts.json`` — the dirty count and recording state of every checkpoint bitmap as nbdsrv
  saw it last, tagged with ``last_op``: a later operation of nbdsrv's own makes them stale.
"""

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

from ..errors import NbdsrvError
from ..private_files import write_whole

FORMAT_VERSION = 1


class StoreError(NbdsrvError):
    """Metadata could not be written (the disk is full, the directory is gone, ...)."""

    code = "store"


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.
    On failure the old file stays, the temporary file is removed, and the error names
    ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write_whole(tmp, data, fsync=True)
        os.rename(tmp, path)
        fsync_directory(directory)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e


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


def _is_leftover_temporary(name: str) -> bool:
    """``.NAME.PID.tmp`` of another process than this one."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    pid = name[: -len(".tmp")].rpartition(".")[2]
    return pid.isdigit() and int(pid) != os.getpid()


class VMStore:
    """The files of one VM under the state directory."""

    def __init__(self, state_dir: str, vm: str) -> None:
        self.directory = os.path.join(state_dir, "vms", vm)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.checkpoints_path = os.path.join(self.directory, "checkpoints.json")
        self.intent_path = os.path.join(self.directory, "intent.json")
        self.counts_path = os.path.join(self.directory, "counts.json")
        self.remove_leftover_temporaries()

    def remove_leftover_temporaries(self) -> None:
        """Remove the temporary files of writes that a killed daemon did not finish
        (``.NAME.PID.tmp``, see :func:`write_atomic`): the old documents stand."""
        for directory in (self.directory, self.sessions_dir):
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(directory):
                    if _is_leftover_temporary(name):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(directory, name))

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

    # -- bitmap counts nbdsrv saw last, to notice bits that someone else removed -------------

    def load_counts(self, op_id: str | None) -> dict[tuple[str, str], tuple[int, bool]]:
        """The counts seen since operation ``op_id`` (the document's ``last_op``); none when
        they were taken before it: nbdsrv's own operations change counts."""
        document = read_json(self.counts_path)
        if not isinstance(document, dict) or document.get("op") != op_id:
            return {}
        return {
            (str(s["file"]), str(s["bitmap"])): (int(s["count"]), bool(s["recording"]))
            for s in document.get("seen", [])
        }

    def save_counts(
        self, op_id: str | None, seen: Mapping[tuple[str, str], tuple[int, bool]]
    ) -> None:
        records = [
            {"file": file, "bitmap": bitmap, "count": count, "recording": recording}
            for (file, bitmap), (count, recording) in sorted(seen.items())
        ]
        write_json(self.counts_path, {"op": op_id, "seen": records})

    def clear_counts(self) -> None:
        """Forget the counts: after an operation of ours that changed bitmaps but failed
        (and so wrote no new ``last_op``), the next look takes new ones."""
        remove_durably(self.counts_path)

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
