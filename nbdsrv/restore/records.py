"""Crash-safe records of restore sessions: ``<state-dir>/restore/records/ID.json``.

Written atomically (nbdsrv.backup.store.write_atomic) at each step where a kill would leave
something behind::

    "opening"  written before QEMU is asked for anything (and before an image is created):
               a restarted daemon finds begin half done — it removes an image begin created,
               and the record.
    "open"     the session runs: a restarted daemon opens it again under the same id (a
               live restore's copy resumes where the image stands).
    "ending"   end has begun: a restarted daemon only removes the record (nbdsrv's QEMU
               died with it and closed the image).
    "ready"    (a field) the copy from the source completed: the source is not needed again.
    "live_step" (a field) of a live restore into a disk: "stream", "mirror" or "pivot", the
               step under way (nbdsrv/restore/into_disk.py); None once done. "overlay" names
               its temporary overlay file, removed by a restarted daemon on "opening" and
               "ending".
"""

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..backup.store import read_json, remove_durably, write_json

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RestoreRecord:
    id: str
    image: str
    format: str
    size: int
    step: str  # "opening", "open", "ending"
    created_image: bool
    vm: str | None = None
    disk: str | None = None
    source: str | None = None
    ready: bool = False
    # The libvirt URI of a restore into a shut-off domain's disk (its image opened with the
    # backing chain its header names).
    libvirt: str | None = None
    overlay: str | None = None
    live_step: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "RestoreRecord":
        fields = {k: v for k, v in document.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


class RestoreRecords:
    def __init__(self, state_dir: str) -> None:
        self.directory = os.path.join(state_dir, "restore", "records")

    def write(self, record: RestoreRecord) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        write_json(self._path(record.id), record.to_json())

    def remove(self, session_id: str) -> None:
        remove_durably(self._path(session_id))

    def all(self) -> list[RestoreRecord]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                document = read_json(os.path.join(self.directory, name))
                if isinstance(document, dict):
                    records.append(RestoreRecord.from_json(document))
        return records

    def _path(self, session_id: str) -> str:
        return os.path.join(self.directory, f"{session_id}.json")
