"""``restore list`` follows a live restore into a disk through its steps: ``step`` stream →
mirror → (pivot) → null, with ``state`` streaming until ready; during the copy into the disk
``mirrored_bytes`` grows to the disk's size, in --json and in the text table alike. A live
restore into an image shows ``step`` stream and no ``mirrored_bytes``."""

import time
from pathlib import Path
from typing import Any

from nbdsrv.restore.sessions import BeginRestore
from tests.restore.conftest import Served
from tests.restore.test_live import Source, wait_state
from tests.restore.test_live import backup as backup  # the fixture
from tests.restore.test_live_disk import SIZE, Setup, sha
from tests.restore.test_live_disk import setup as setup  # the fixture (2 MiB/s copies)

TEXT_HEADING = ["RESTORE", "STATE", "STEP", "INTO", "WRITTEN", "STREAMED", "MIRRORED", "OF"]


def text_row(setup: Setup, session_id: str) -> list[str]:
    """The session's row of ``nbdsrv restore list`` (text), split into its columns."""
    result = setup.daemon.cli("restore", "list")
    assert result.returncode == 0, result.stderr
    heading, *rows = result.stdout.splitlines()
    assert heading.split() == TEXT_HEADING, result.stdout
    [row] = [line.split() for line in rows if line.split()[0] == session_id]
    return row


def test_list_follows_the_copy_into_the_disk(setup: Setup) -> None:
    daemon = setup.daemon
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    assert began["step"] == "stream" and began["mirrored_bytes"] == 0, began

    seen: list[dict[str, Any]] = []
    mirror_row: list[str] | None = None
    deadline = time.monotonic() + 120
    while True:
        [info] = daemon.json("restore", "list")
        seen.append(info)
        if info["state"] in ("ready", "failed"):
            break
        if info["step"] == "mirror" and mirror_row is None:
            mirror_row = text_row(setup, began["id"])
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.2)

    last = seen[-1]
    assert last["state"] == "ready" and last["step"] is None, last
    assert last["mirrored_bytes"] == SIZE and last["streamed_bytes"] == SIZE, last
    steps = [info["step"] for info in seen]
    # In order, each step once: stream, then mirror, then (a moment) pivot, then done.
    order = [step for i, step in enumerate(steps) if i == 0 or steps[i - 1] != step]
    assert order in (["stream", "mirror", None], ["stream", "mirror", "pivot", None]), order
    for info in seen:
        if info["step"] == "stream":
            assert info["state"] == "streaming" and info["mirrored_bytes"] == 0, info
    mirroring = [info for info in seen if info["step"] == "mirror"]
    for info in mirroring:
        assert info["state"] == "streaming" and info["streamed_bytes"] == SIZE, info
    mirrored = [info["mirrored_bytes"] for info in mirroring]
    assert mirrored == sorted(mirrored), mirrored  # it only grows
    # At 2 MiB/s the 16 MiB copy into the disk is seen part way, more than once.
    assert len({m for m in mirrored if 0 < m < SIZE}) >= 2, mirrored

    # The text table: one line, the step and the bytes copied into the disk in their columns.
    assert mirror_row is not None
    session_id, state, step, into, _written, streamed, mirrored_text, size = mirror_row
    assert (session_id, state, step, into) == (began["id"], "streaming", "mirror", "vm1/disk0")
    assert streamed == str(SIZE) and size == str(SIZE), mirror_row
    assert 0 <= int(mirrored_text) <= SIZE, mirror_row
    ready_row = text_row(setup, began["id"])
    assert ready_row[1:3] == ["ready", "-"] and ready_row[6] == str(SIZE), ready_row

    daemon.json("restore", "end", began["id"])
    assert sha(setup.disk_now()) == sha(setup.a)


async def test_an_image_live_restore_shows_the_stream_step(
    restore: Served, backup: tuple[Source, bytes], tmp_path: Path
) -> None:
    source, _ = backup
    began = await restore.sessions.begin(
        BeginRestore(image=str(tmp_path / "new.qcow2"), source=source.uri)
    )
    assert began["step"] == "stream" and began["mirrored_bytes"] is None, began
    ready = await wait_state(restore, began["id"], "ready", "failed")
    assert ready["state"] == "ready" and ready["step"] is None, ready
    assert ready["mirrored_bytes"] is None
    await restore.sessions.end(began["id"])
    plain = await restore.sessions.begin(
        BeginRestore(image=str(tmp_path / "plain.qcow2"), size=1024 * 1024)
    )
    assert plain["step"] is None and plain["mirrored_bytes"] is None, plain
    await restore.sessions.end(plain["id"])
