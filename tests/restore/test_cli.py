"""The restore commands of a real ``nbdsrv daemon``: begin, list, end with --json, nbdcopy
in between, the image checked by sha256; a restarted daemon opens the session again."""

import random
from pathlib import Path

from tests.conftest import StartDaemon
from tests.harness.tools import require_tool, run
from tests.restore.conftest import file_sha256

MiB = 1024 * 1024
CONTRACT_FIELDS = {
    "id", "image", "vm", "disk", "format", "size", "export", "uri", "uris", "source", "state",
    "error", "written_bytes", "streamed_bytes", "step", "mirrored_bytes",
}  # fmt: skip


def test_restore_commands(nbdsrv_daemons: StartDaemon, short_dir: Path, tmp_path: Path) -> None:
    socket = short_dir / "nbd.sock"
    daemon = nbdsrv_daemons("--listen", f"unix:{socket}")
    backup = tmp_path / "backup.raw"
    backup.write_bytes(random.Random(5).randbytes(4 * MiB))
    image = tmp_path / "restored.raw"

    began = daemon.json(
        "restore", "begin", "--image", str(image), "--size", str(4 * MiB), "--format", "raw"
    )
    assert set(began) == CONTRACT_FIELDS
    assert began["state"] == "writable" and began["vm"] is None and began["source"] is None
    assert began["uri"] == f"nbd+unix:///restore/{began['id']}?socket={socket}"
    run([require_tool("nbdcopy"), str(backup), began["uri"]])

    [listed] = daemon.json("restore", "list")
    assert listed["id"] == began["id"] and listed["written_bytes"] == 4 * MiB

    message = daemon.error("restore", "begin", "--image", str(image))
    assert "being restored already" in message

    # A daemon stopped with a session running opens it again under the same id.
    daemon.stop()
    daemon.start()
    [again] = daemon.json("restore", "list")
    assert again["id"] == began["id"] and again["state"] == "writable"

    ended = daemon.json("restore", "end", began["id"])
    assert ended["id"] == began["id"]
    assert daemon.json("restore", "list") == []
    assert file_sha256(image) == file_sha256(backup)
    assert "no restore session" in daemon.error("restore", "end", began["id"])
