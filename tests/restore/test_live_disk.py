"""Live restore (--source) into a disk of an --image VM: an older full backup, served read-only
by qemu-nbd, restored into the disk while the export is read and written. The export reads as
the source at once; afterwards the disk is the source plus the writes (sha256), the newest
checkpoint's bitmap covers every block the restore wrote (the mirror into the disk writes
all of it), and full + incremental rebuild the disk. Bad input changes nothing; a killed
daemon resumes; --abort while streaming leaves the disk as it was."""

import asyncio
import hashlib
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartDaemon
from tests.harness.daemon import DaemonProcess
from tests.harness.tools import SYSTEM_PATH_FIRST, require_tool, run
from tests.restore.test_live import Source

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
# Written through restore/ID while it streams (one where the source has data, one in a hole).
WRITES = [(2 * MiB, 256 * KiB, 0x5A), (12 * MiB + 4 * KiB, 64 * KiB, 0xA5)]
MIRRORING_WRITE = (7 * MiB + 512, 100 * KiB, 0x77)  # while the overlay goes into the disk


def qemu_io(uri: str, command: str) -> None:
    run([require_tool("qemu-io"), "-f", "raw", "-c", command, uri])


def read_all(uri: str, path: Path) -> bytes:
    run([require_tool("nbdcopy"), uri, str(path)])
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dirty_ranges(uri: str, context: str) -> list[tuple[int, int]]:
    out = run([require_tool("nbdinfo"), "--json", f"--map={context}", uri])
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def write_with_nbdsh(
    uri: str, offset: int, length: int, pattern: int, *, flush: bool = False
) -> None:
    """``length`` bytes of ``pattern`` at ``offset`` through nbdsh (then a FLUSH if asked)."""
    script = f"h.pwrite(bytes([{pattern}]) * {length}, {offset})" + ("\nh.flush()" if flush else "")
    run([require_tool("nbdsh"), "-u", uri, "-c", script], env=SYSTEM_PATH_FIRST)


def wait_state(daemon: DaemonProcess, session_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        [info] = [s for s in daemon.json("restore", "list") if s["id"] == session_id]
        if info["state"] in states or time.monotonic() > deadline:
            return dict(info)
        time.sleep(0.2)


class Setup:
    """An --image VM whose disk went A (the backup served as the source) → B (the newest
    checkpoint); B differs from A everywhere a restore has to put A back, holes included."""

    def __init__(self, daemons: StartDaemon, short_dir: Path, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.disk = tmp_path / "disk.qcow2"
        run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(self.disk), str(SIZE)])
        self.daemon = daemons(
            "--listen", f"unix:{short_dir / 'nbd.sock'}", "--image", f"vm1={self.disk}"
        )
        self.live = f"nbd+unix:///disk0?socket={self.daemon.state_dir}/vm1.live.sock"
        qemu_io(self.live, f"write -P 0x11 0 {4 * MiB}")
        qemu_io(self.live, f"write -P 0x44 {6 * MiB} {2 * MiB}")
        point_a = self.daemon.json("backup", "begin", "vm1")
        self.a = read_all(point_a["disks"]["disk0"]["uri"], tmp_path / "a.raw")
        self.daemon.json("backup", "end", "vm1", point_a["id"])
        # B: over A's data, and over A's holes (the restore must zero them again).
        qemu_io(self.live, f"write -P 0x22 {1 * MiB} {MiB}")
        qemu_io(self.live, f"write -P 0x33 {10 * MiB} {3 * MiB}")
        point_b = self.daemon.json("backup", "begin", "vm1")
        self.newest = point_b["checkpoint"]
        self.b = read_all(point_b["disks"]["disk0"]["uri"], tmp_path / "b.raw")
        self.daemon.json("backup", "end", "vm1", point_b["id"])
        assert self.a != self.b
        # The older backup, as a backup product keeps it: a sparse qcow2, served read-only.
        backup = tmp_path / "a.qcow2"
        run(
            [
                require_tool("qemu-img"),
                "convert",
                "-O",
                "qcow2",
                str(tmp_path / "a.raw"),
                str(backup),
            ]
        )
        self.source = Source(backup, short_dir / "src.sock")
        asyncio.run(self.source.start())

    def disk_now(self) -> bytes:
        return read_all(self.live, self.tmp / "now.raw")

    def overlays(self) -> list[Path]:
        return list(self.tmp.glob("disk.qcow2.restore-*"))


@pytest.fixture
def setup(
    nbdsrv_daemons: StartDaemon,
    short_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    monkeypatch.setenv("NBDSRV_RESTORE_SPEED", str(2 * MiB))  # streaming for some seconds
    s = Setup(nbdsrv_daemons, short_dir, tmp_path)
    try:
        yield s
    finally:
        s.source.kill()


def test_live_restore_into_a_disk(setup: Setup) -> None:
    daemon = setup.daemon
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    assert began["state"] == "streaming" and began["size"] == SIZE, began
    assert began["vm"] == "vm1" and began["disk"] == "disk0"
    assert [p.name for p in setup.overlays()] == [f"disk.qcow2.restore-{began['id']}.qcow2"]

    # Reads as the source at once, while the copy goes on.
    assert sha(read_all(began["uri"], setup.tmp / "early.raw")) == sha(setup.a)
    assert daemon.json("restore", "list")[0]["state"] == "streaming"
    script = "\n".join(f"h.pwrite(bytes([{p}]) * {n}, {o})" for o, n, p in WRITES)
    run(
        [require_tool("nbdsh"), "-u", began["uri"], "-c", script + "\nh.flush()"],
        env=SYSTEM_PATH_FIRST,
    )
    expected = bytearray(setup.a)
    for offset, length, pattern in WRITES:
        expected[offset : offset + length] = bytes([pattern]) * length
    assert sha(read_all(began["uri"], setup.tmp / "mid.raw")) == sha(bytes(expected))

    # Written while the overlay is mirrored into the disk: write-blocking, both get it.
    wait_step(daemon, began["id"], "mirror")
    assert daemon.json("restore", "list")[0]["state"] == "streaming"
    offset, length, pattern = MIRRORING_WRITE
    write_with_nbdsh(began["uri"], offset, length, pattern)
    expected[offset : offset + length] = bytes([pattern]) * length

    info = wait_state(daemon, began["id"], "ready", "failed")
    assert info["state"] == "ready" and info["streamed_bytes"] == SIZE, info
    assert setup.overlays() == []  # T is gone once the export sits on the disk
    assert sha(read_all(began["uri"], setup.tmp / "ready.raw")) == sha(bytes(expected))
    daemon.json("restore", "end", began["id"])
    assert daemon.json("restore", "list") == []

    # The disk itself (through its live export, back again) is the source plus the writes.
    assert sha(setup.disk_now()) == sha(bytes(expected))

    # Every block the restore wrote is dirty since the newest checkpoint: the mirror into the
    # disk writes all of it, so that is the whole disk.
    incremental = daemon.json("backup", "begin", "vm1", "--from", setup.newest)
    uri = incremental["disks"]["disk0"]["uri"]
    dirty = dirty_ranges(uri, f"qemu:dirty-bitmap:{setup.newest}")
    assert dirty == [(0, SIZE)], dirty
    # Full (B) + the incremental's dirty blocks rebuild the restored disk.
    rebuilt = bytearray(setup.b)
    for offset, length in dirty:
        piece = setup.tmp / "piece.raw"
        run(
            [
                require_tool("nbdsh"),
                "-u",
                uri,
                "-c",
                f"open({str(piece)!r}, 'wb').write(h.pread({length}, {offset}))",
            ],
            env=SYSTEM_PATH_FIRST,
        )
        rebuilt[offset : offset + length] = piece.read_bytes()
    daemon.json("backup", "end", "vm1", incremental["id"])
    assert sha(bytes(rebuilt)) == sha(bytes(expected))


def test_bad_input_changes_nothing(setup: Setup, short_dir: Path) -> None:
    daemon = setup.daemon
    before = sha(setup.disk_now())
    # A source of another size.
    other = setup.tmp / "other.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(other), str(SIZE // 2)])
    smaller = Source(other, short_dir / "other.sock")
    asyncio.run(smaller.start())
    try:
        message = daemon.error(
            "restore", "begin", "vm1", "--disk", "disk0", "--source", smaller.uri
        )
    finally:
        smaller.kill()
    assert "must be the disk's size" in message and "\n" not in message.strip(), message
    # A source nobody serves.
    gone = f"nbd+unix:///backup?socket={short_dir / 'nobody.sock'}"
    message = daemon.error("restore", "begin", "vm1", "--disk", "disk0", "--source", gone)
    assert "source unreachable" in message and "\n" not in message.strip(), message
    assert daemon.json("restore", "list") == []
    assert setup.overlays() == []
    assert sha(setup.disk_now()) == before  # the live export is back, the disk unchanged


def test_abort_while_streaming_leaves_the_disk(setup: Setup) -> None:
    daemon = setup.daemon
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    assert "still copying" in daemon.error("restore", "end", began["id"])
    daemon.json("restore", "end", began["id"], "--abort")
    assert daemon.json("restore", "list") == []
    assert setup.overlays() == []
    assert sha(setup.disk_now()) == sha(setup.b)


def wait_step(daemon: DaemonProcess, session_id: str, step: str) -> None:
    record = Path(daemon.state_dir, "restore", "records", f"{session_id}.json")
    deadline = time.monotonic() + 120
    while json.loads(record.read_text()).get("live_step") != step:
        assert time.monotonic() < deadline, record.read_text()
        time.sleep(0.1)


def test_abort_while_copying_into_the_disk_then_again(setup: Setup) -> None:
    """--abort during the mirror leaves a partly written disk (documented); nothing else is
    left behind, and a new live restore makes the disk exact."""
    daemon = setup.daemon
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    wait_step(daemon, began["id"], "mirror")
    assert "still copying" in daemon.error("restore", "end", began["id"])
    daemon.json("restore", "end", began["id"], "--abort")
    assert daemon.json("restore", "list") == []
    assert setup.overlays() == []
    again = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    assert wait_state(daemon, again["id"], "ready", "failed")["state"] == "ready"
    daemon.json("restore", "end", again["id"])
    assert sha(setup.disk_now()) == sha(setup.a)


@pytest.mark.parametrize("fault", ["restore-disk-streamed", "restore-disk-pivot"])
def test_a_killed_daemon_finishes_the_restore(setup: Setup, fault: str) -> None:
    """Killed once the overlay stands alone (the mirror runs again after the restart), or
    once the mirror converged (the pivot counts as done; with a write made while mirroring,
    at NBDSRV_RESTORE_SPEED)."""
    daemon = setup.daemon
    daemon.stop()
    with pytest.MonkeyPatch.context() as env:
        if fault == "restore-disk-streamed":
            env.setenv("NBDSRV_RESTORE_SPEED", "0")
        daemon.start(fault=fault)
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    expected = bytearray(setup.a)
    if fault == "restore-disk-pivot":
        wait_step(daemon, began["id"], "mirror")
        offset, length, pattern = MIRRORING_WRITE
        write_with_nbdsh(began["uri"], offset, length, pattern)
        expected[offset : offset + length] = bytes([pattern]) * length
    assert daemon.proc is not None and daemon.proc.wait(60) == -signal.SIGKILL
    daemon.start()
    info = wait_state(daemon, began["id"], "ready", "failed")
    assert info["state"] == "ready", info
    daemon.json("restore", "end", began["id"])
    assert setup.overlays() == []
    assert sha(setup.disk_now()) == sha(bytes(expected))


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_daemon_killed_or_stopped_mid_stream_resumes_with_the_writes(
    setup: Setup, how: str
) -> None:
    daemon = setup.daemon
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    offset, length, pattern = WRITES[0]
    write_with_nbdsh(began["uri"], offset, length, pattern, flush=True)
    assert daemon.json("restore", "list")[0]["state"] == "streaming"
    if how == "kill":
        daemon.kill()
    else:
        assert daemon.stop() == 0
    daemon.start()
    info = wait_state(daemon, began["id"], "ready", "failed")
    assert info["state"] == "ready", info
    daemon.json("restore", "end", began["id"])
    expected = bytearray(setup.a)
    expected[offset : offset + length] = bytes([pattern]) * length
    assert setup.overlays() == []
    assert sha(setup.disk_now()) == sha(bytes(expected))


def test_a_raw_disk(nbdsrv_daemons: StartDaemon, short_dir: Path, tmp_path: Path) -> None:
    """A raw disk takes a live restore too: the overlay is qcow2, the disk only the mirror's
    target."""
    data = bytearray(random.Random(5).randbytes(SIZE))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)
    (tmp_path / "a.raw").write_bytes(bytes(data))
    backup = tmp_path / "a.qcow2"
    run([require_tool("qemu-img"), "convert", "-O", "qcow2", str(tmp_path / "a.raw"), str(backup)])
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x66" * SIZE)
    daemon = nbdsrv_daemons("--listen", f"unix:{short_dir / 'nbd.sock'}", "--image", f"vm1={disk}")
    source = Source(backup, short_dir / "src.sock")
    asyncio.run(source.start())
    try:
        began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", source.uri)
        info = wait_state(daemon, began["id"], "ready", "failed")
        assert info["state"] == "ready", info
        daemon.json("restore", "end", began["id"])
    finally:
        source.kill()
    live = f"nbd+unix:///disk0?socket={daemon.state_dir}/vm1.live.sock"
    assert sha(read_all(live, tmp_path / "now.raw")) == sha(bytes(data))
    assert list(tmp_path.glob("disk.raw.restore-*")) == []


def test_the_source_goes_away_and_comes_back(setup: Setup) -> None:
    daemon = setup.daemon
    began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", setup.source.uri)
    setup.source.kill()
    info = wait_state(daemon, began["id"], "source unreachable", "ready", "failed")
    assert info["state"] == "source unreachable", info
    assert "still copying" in daemon.error("restore", "end", began["id"])
    asyncio.run(setup.source.start())
    info = wait_state(daemon, began["id"], "ready", "failed")
    assert info["state"] == "ready", info
    daemon.json("restore", "end", began["id"])
    assert setup.overlays() == []
    assert sha(setup.disk_now()) == sha(setup.a)
