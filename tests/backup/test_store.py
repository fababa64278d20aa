"""Atomic metadata writes."""

import json
import os
import sys
from pathlib import Path

import pytest

from nbdsrv.backup.store import VMStore, write_atomic
from tests.harness.tools import require_tool, run


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


FILL_AND_WRITE = """
import os, sys
from nbdsrv.backup.store import StoreError, write_atomic
directory = sys.argv[1]
path = os.path.join(directory, "checkpoints.json")
write_atomic(path, b"old")
fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    os.close(fd)
try:
    write_atomic(path, b"n" * 200_000)
except StoreError as e:
    print(e)
print(sorted(os.listdir(directory)))
print(open(path, "rb").read().decode())
"""


def test_write_atomic_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    """On a real full file system (a 256 KiB tmpfs in a private mount namespace)."""
    unshare = require_tool("unshare")
    directory = tmp_path / "full"
    directory.mkdir()
    script = f'mount -t tmpfs -o size=256k tmpfs {directory} && exec {sys.executable} -c "$0" $1'
    out = run([unshare, "-rm", "sh", "-c", script, FILL_AND_WRITE, str(directory)]).splitlines()
    assert out[0] == f"cannot write {directory}/checkpoints.json: No space left on device"
    assert out[1] == "['checkpoints.json', 'filler']"  # no temporary file left behind
    assert out[2] == "old"
