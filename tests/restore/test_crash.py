"""A daemon killed in the middle of a restore: the restarted one removes what a cut-short
begin created, and resumes a live restore's copy to an exact image (sha256)."""

import asyncio
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import StartDaemon
from tests.harness.tools import require_tool, run
from tests.restore.conftest import file_sha256, image_sha256
from tests.restore.test_live import Source

MiB = 1024 * 1024
SIZE = 16 * MiB


@pytest.mark.parametrize("fault", ["restore-image-created", "restore-before-open-record"])
def test_a_begin_cut_short_leaves_nothing(
    nbdsrv_daemons: StartDaemon, short_dir: Path, tmp_path: Path, fault: str
) -> None:
    daemon = nbdsrv_daemons("--listen", f"unix:{short_dir / 'nbd.sock'}")
    daemon.stop()
    daemon.start(fault=fault)
    image = tmp_path / "new.qcow2"
    result = daemon.cli("restore", "begin", "--image", str(image), "--size", str(MiB))
    assert result.returncode != 0
    assert daemon.proc is not None and daemon.proc.wait(30) == -signal.SIGKILL
    daemon.start()
    assert daemon.json("restore", "list") == []
    assert not image.exists()
    assert not list(Path(daemon.state_dir, "restore", "records").glob("*.json"))


def test_a_killed_daemon_resumes_the_copy(
    nbdsrv_daemons: StartDaemon,
    short_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = random.Random(3).randbytes(SIZE)
    raw = tmp_path / "backup.raw"
    raw.write_bytes(data)
    qcow2 = tmp_path / "backup.qcow2"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    source = Source(qcow2, short_dir / "src.sock")
    asyncio.run(source.start())
    try:
        monkeypatch.setenv("NBDSRV_RESTORE_SPEED", str(2 * MiB))  # ~8 s: time to kill it
        daemon = nbdsrv_daemons("--listen", f"unix:{short_dir / 'nbd.sock'}")
        image = tmp_path / "restored.qcow2"
        began = daemon.json("restore", "begin", "--image", str(image), "--source", source.uri)
        assert began["state"] == "streaming"
        time.sleep(1)
        daemon.kill()
        monkeypatch.setenv("NBDSRV_RESTORE_SPEED", "0")
        daemon.start()
        deadline = time.monotonic() + 120
        while True:
            [info] = daemon.json("restore", "list")
            assert info["id"] == began["id"]
            if info["state"] in ("ready", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert info["state"] == "ready", info
        daemon.json("restore", "end", began["id"])
        assert asyncio.run(image_sha256(image)) == file_sha256(raw)
    finally:
        source.kill()
