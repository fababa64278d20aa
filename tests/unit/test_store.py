"""Atomic metadata writes."""

import json
import os
from pathlib import Path

import pytest

from nbdsrv.backup.store import VMStore, write_atomic


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    write_atomic(str(path), b"old")
    write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["doc.json"]


def test_store_round_trip_and_intent_lifecycle(tmp_path: Path) -> None:
    store = VMStore(str(tmp_path), "vm1")
    assert store.load_checkpoints()["checkpoints"] == []
    store.write_intent({"id": "op1", "op": "create"})
    assert store.read_intent() == {"id": "op1", "op": "create"}
    store.save_checkpoints({"last_op": "op1", "checkpoints": []})
    store.clear_intent()
    assert store.read_intent() is None
    assert json.loads(Path(store.checkpoints_path).read_text())["last_op"] == "op1"
    assert oct(os.stat(store.checkpoints_path).st_mode & 0o777) == "0o600"


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    store = VMStore(str(tmp_path), "vm1")
    Path(store.checkpoints_path).write_text('{"version": 99}')
    with pytest.raises(ValueError, match="unknown format version 99"):
        store.load_checkpoints()
