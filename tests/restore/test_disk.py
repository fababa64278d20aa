"""restore begin VM --disk DISK into a disk of an --image VM: refused while a writer is on
its live export; the restore's writes go through the QSD that holds the disk, so the newest
checkpoint's bitmap records them — backup begin --from that checkpoint shows exactly the
restored blocks, and full + that incremental rebuild the restored disk (by sha256)."""

import hashlib
import json
import subprocess
import time
from pathlib import Path

from tests.conftest import StartDaemon
from tests.harness.tools import SYSTEM_PATH_FIRST, require_tool, run

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
CHANGED = [(1 * MiB, MiB), (6 * MiB, 64 * KiB)]  # written after point A, restored to A


def qemu_io(uri: str, command: str) -> None:
    run([require_tool("qemu-io"), "-f", "raw", "-c", command, uri])


def nbdsh(uri: str, script: str, *options: str) -> str:
    return run([require_tool("nbdsh"), *options, "-u", uri, "-c", script], env=SYSTEM_PATH_FIRST)


def read_all(uri: str, path: Path) -> bytes:
    run([require_tool("nbdcopy"), uri, str(path)])
    return path.read_bytes()


def dirty_ranges(uri: str, context: str) -> list[tuple[int, int]]:
    out = run([require_tool("nbdinfo"), "--json", f"--map={context}", uri])
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def test_restore_into_a_disk_keeps_checkpoints_exact(
    nbdsrv_daemons: StartDaemon, short_dir: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    daemon = nbdsrv_daemons("--listen", f"unix:{short_dir / 'nbd.sock'}", "--image", f"vm1={disk}")
    live = f"nbd+unix:///disk0?socket={daemon.state_dir}/vm1.live.sock"

    qemu_io(live, f"write -P 0x11 0 {4 * MiB}")
    qemu_io(live, f"write -P 0x44 {6 * MiB} {2 * MiB}")
    point_a = daemon.json("backup", "begin", "vm1")
    a = read_all(point_a["disks"]["disk0"]["uri"], tmp_path / "a.raw")
    daemon.json("backup", "end", "vm1", point_a["id"])

    qemu_io(live, f"write -P 0x22 {CHANGED[0][0]} {CHANGED[0][1]}")
    qemu_io(live, f"write -P 0x33 {CHANGED[1][0]} {CHANGED[1][1]}")
    point_b = daemon.json("backup", "begin", "vm1")
    newest = point_b["checkpoint"]
    b = read_all(point_b["disks"]["disk0"]["uri"], tmp_path / "b.raw")
    daemon.json("backup", "end", "vm1", point_b["id"])
    assert a != b

    # A writer on the live export: refused, nothing changed.
    holder = subprocess.Popen(
        [require_tool("nbdsh"), "-u", live, "-c", "import time; time.sleep(60)"],
        env={**SYSTEM_PATH_FIRST},
    )
    try:
        time.sleep(1.5)
        message = daemon.error("restore", "begin", "vm1", "--disk", "disk0")
        assert "writer connected" in message, message
        assert daemon.json("restore", "list") == []
    finally:
        holder.kill()
        holder.wait()

    # Restore point A where it differs from B (what an incremental restore writes).
    restore = daemon.json("restore", "begin", "vm1", "--disk", "disk0")
    assert restore["vm"] == "vm1" and restore["disk"] == "disk0" and restore["size"] == SIZE
    assert restore["image"] == str(disk) and restore["state"] == "writable"
    script = "\n".join(
        f"h.pwrite(open({str(tmp_path / 'a.raw')!r}, 'rb').read()[{o}:{o + n}], {o})"
        for o, n in CHANGED
    )
    nbdsh(restore["uri"], script + "\nh.flush()")
    assert daemon.json("restore", "list")[0]["written_bytes"] == sum(n for _, n in CHANGED)
    # While the restore holds the disk, backups and snapshots of the VM wait for its end.
    for command in (("backup", "begin", "vm1"), ("snapshot", "create", "vm1")):
        message = daemon.error(*command)
        assert message == (
            f"{' '.join(command[:2])}: a restore into disk disk0 of VM vm1 is running "
            f"(restore {restore['id']}); end it first"
        ), message
    daemon.json("restore", "end", restore["id"])

    # The live export is back, and the disk now reads as point A.
    qemu_io(live, f"read -P 0x11 0 {MiB}")
    incremental = daemon.json("backup", "begin", "vm1", "--from", newest)
    uri = incremental["disks"]["disk0"]["uri"]
    assert dirty_ranges(uri, f"qemu:dirty-bitmap:{newest}") == CHANGED
    rebuilt = bytearray(b)
    for offset, length in CHANGED:
        piece = tmp_path / "piece.raw"
        nbdsh(uri, f"open({str(piece)!r}, 'wb').write(h.pread({length}, {offset}))")
        rebuilt[offset : offset + length] = piece.read_bytes()
    whole = read_all(uri, tmp_path / "now.raw")
    daemon.json("backup", "end", "vm1", incremental["id"])
    assert hashlib.sha256(rebuilt).hexdigest() == hashlib.sha256(a).hexdigest()
    assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(a).hexdigest()
