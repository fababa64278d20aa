"""Live restore of the real guest of tests/guest from its own backups (docs/restore.md).

Backup side: guest A writes files through its agent between one full and two incremental
backups taken through nbdsrv (`--qmp`), and more files during each session (after its point
in time); the backups become a qcow2 chain, full.qcow2 ← inc1.qcow2 ← inc2.qcow2
(backup_chain.py), which `qemu-nbd -r` serves.

Restore side: a second nbdsrv live-restores that chain into a new qcow2 (`restore begin
--image NEW --source nbd+unix://…`) and guest B boots from `restore/ID` while the copy runs:
it reads every file (sha256 inside the guest), writes new ones and overwrites one in place.
The copy is slowed on purpose (NBDSRV_RESTORE_SPEED, docs/reference.md) to last at least
COPY_VS_BOOT times as long as guest A took to boot, so that B boots, reads and writes while it
runs, on a loaded machine too. Once `restore list` says `ready` the source is stopped and B
reads everything again from the restored image; then B shuts down cleanly, `restore end`,
and the image must stand alone (no backing file), pass `e2fsck -fn` as it is, and hold
exactly the files of the last backup's point in time plus B's writes, by sha256.

The time from `restore begin` to the guest's first read is printed with the other steps of
the boot, figures for docs/restore.md, never asserted: the first read is the one QEMU's
blockstats of B's virtio-blk device count first (polled every POLL s), the firmware's, made
before the kernel starts; the kernel reads the disk when it mounts /data, which the guest's
init says on its console (polled too). Guest A's boot from a local qcow2 is timed the same
way, for comparison.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartDaemon
from tests.guest.backup_chain import BackupChain
from tests.guest.build import Guest
from tests.guest.conftest import TOOLS
from tests.guest.ext4 import check_consistent, read_file, regular_files
from tests.guest.files import Files
from tests.guest.nbd_disk_vm import NBDDiskGuestVM
from tests.guest.vm import BOOT_TIMEOUT, DATA_DISK_SIZE, DISK_ID, GuestVM, make_data_disk
from tests.harness.checksums import sha256 as sha
from tests.harness.daemon import DaemonProcess
from tests.harness.tools import require_tool, run, stop_process
from tests.harness.waiting import wait_for

K = 1024
MiB = K * K
# The copy lasts at least this many times guest A's boot, and at least MIN_COPY_SECONDS.
COPY_VS_BOOT = 2.0
MIN_COPY_SECONDS = 20.0
POLL = 0.01


def test_live_restore_of_a_backed_up_guest(
    guest: Guest,
    nbdsrv_daemons: StartDaemon,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for tool in (*TOOLS, "qemu-nbd"):
        require_tool(tool)
    backups = short_dir / "backups"
    backups.mkdir()
    chain = BackupChain(backups)

    (short_dir / "a").mkdir()
    vm_a = GuestVM(short_dir / "a", guest)
    try:
        make_data_disk(vm_a.disk)
        started = time.monotonic()
        vm_a.launch()
        _wait_mounted(vm_a)
        mounted_a = time.monotonic() - started
        vm_a.wait_booted()
        boot_a = time.monotonic() - started
        backer = nbdsrv_daemons(
            "--listen", f"unix:{short_dir / 'backup.nbd'}", "--qmp", f"vm={vm_a.qmp_path}",
            name="backup",
        )  # fmt: skip
        expected = _back_up(vm_a, backer, chain)
        assert backer.stop() == 0
    finally:
        vm_a.stop()
        print(f"--- console of guest A\n{vm_a.console_text()}")

    # The chain's top is the last point in time, crash-consistent (no freeze).
    _check_image(chain.top, short_dir / "chain.raw", expected, clean=False)

    source_socket = short_dir / "source.sock"
    source: subprocess.Popen[bytes] | None = chain.serve(source_socket, "backup")
    copy_seconds = max(MIN_COPY_SECONDS, COPY_VS_BOOT * boot_a)
    speed = int(DATA_DISK_SIZE / copy_seconds)
    monkeypatch.setenv("NBDSRV_RESTORE_SPEED", str(speed))
    restorer = nbdsrv_daemons("--listen", f"unix:{short_dir / 'restore.nbd'}", name="restore")
    image = short_dir / "restored.qcow2"
    (short_dir / "b").mkdir()
    vm_b = NBDDiskGuestVM(short_dir / "b", guest, restorer.nbd_socket, "")
    try:
        t0 = time.monotonic()
        began = restorer.json(
            "restore", "begin", "--image", str(image),
            "--source", f"nbd+unix:///backup?socket={source_socket}",
        )  # fmt: skip
        t_began = time.monotonic()
        assert began["state"] == "streaming" and began["size"] == DATA_DISK_SIZE, began
        vm_b.export = began["export"]
        vm_b.launch()
        t_launched = time.monotonic()
        deadline = t_launched + BOOT_TIMEOUT
        while vm_b.disk_reads() == 0:
            assert time.monotonic() < deadline, f"no read from the guest\n{vm_b.console_text()}"
            time.sleep(POLL)
        t_first_read = time.monotonic()
        assert _session(restorer, began["id"])["state"] == "streaming"
        _wait_mounted(vm_b)
        t_mounted = time.monotonic()
        vm_b.wait_booted()
        t_booted = time.monotonic()

        # While the copy runs: the guest reads every file, and writes.
        assert _guest_manifest(vm_b) == _digests(expected)
        files = Files(vm_b, now=expected, seed=20)
        files.write("r0", 200 * K)
        files.write("r1", 1024 * K)
        files.overwrite("b2")  # blocks that came from the backup, rewritten while the copy runs
        assert _guest_manifest(vm_b) == _digests(files.now)
        during = _session(restorer, began["id"])
        assert during["state"] == "streaming", f"the copy ended before the guest wrote: {during}"
        assert during["written_bytes"] > 0, during

        wait_for(
            lambda: _session(restorer, began["id"])["state"] in ("ready", "failed"),
            "the live restore is ready",
            timeout=copy_seconds + 120,
        )
        t_ready = time.monotonic()
        ready = _session(restorer, began["id"])
        assert ready["state"] == "ready" and ready["streamed_bytes"] == DATA_DISK_SIZE, ready
        # The image stands alone: without the source, the guest reads the same.
        stop_process(source)
        source = None
        assert _guest_manifest(vm_b) == _digests(files.now)
        vm_b.shut_down()
        ended = restorer.json("restore", "end", began["id"])
        assert ended["id"] == began["id"]
    finally:
        vm_b.stop()
        if source is not None:
            stop_process(source)
        print(f"--- console of guest B\n{vm_b.console_text()}")

    info = json.loads(run([require_tool("qemu-img"), "info", "--output=json", str(image)]))
    assert info["format"] == "qcow2" and "backing-filename" not in info, info
    _check_image(image, short_dir / "restored.raw", files.now, clean=True)
    print(
        f"live restore of the guest, copy limited to {speed} bytes/s. Seconds after `restore "
        f"begin` was called: begin answered {t_began - t0:.3f}, QEMU started "
        f"{t_launched - t0:.3f}, first read by the guest {t_first_read - t0:.3f}, /data "
        f"mounted {t_mounted - t0:.3f}, agent up {t_booted - t0:.3f}, ready "
        f"{t_ready - t0:.3f}. Booting guest B from restore/ID: /data mounted "
        f"{t_mounted - t_launched:.3f} s after QEMU started; guest A from its local qcow2: "
        f"{mounted_a:.3f} s"
    )


def _back_up(vm: GuestVM, daemon: DaemonProcess, chain: BackupChain) -> dict[str, bytes]:
    """A full and two incremental backups into ``chain``; the files of the last point in time."""
    assert daemon.status()["vms"][0]["disks"] == [DISK_ID]
    uri = daemon.uri(f"vm/{DISK_ID}")
    files = Files(vm)
    for i, size in enumerate((1 * K, 100 * K, 1024 * K, 300 * K)):
        files.write(f"a{i}", size)
    session = daemon.json("backup", "begin", "vm", "--checkpoint", "c0")
    files.write("during0", 200 * K)  # after the point in time: in the next incremental
    files.overwrite("a3")
    chain.add_full(uri)
    _end(daemon, session)

    point: dict[str, bytes] = {}
    for n in (1, 2):
        files.write(f"b{n}", n * 150 * K)
        files.overwrite("a0")
        files.remove("a2" if n == 1 else "during0")
        session = daemon.json(
            "backup", "begin", "vm", "--from", f"c{n - 1}", "--checkpoint", f"c{n}"
        )
        point = dict(files.now)
        files.write(f"during{n}", 64 * K)
        files.overwrite("a1")
        dirty = chain.add_incremental(uri, f"qemu:dirty-bitmap:c{n - 1}")
        assert dirty, f"c{n - 1}: nothing dirty"
        assert sum(length for _, length in dirty) < 16 * MiB, dirty  # what the guest changed
        _end(daemon, session)
    return point


def _end(daemon: DaemonProcess, session: dict[str, Any]) -> None:
    result = daemon.cli("backup", "end", "vm", session["id"])
    assert result.returncode == 0, result


def _session(daemon: DaemonProcess, session_id: str) -> dict[str, Any]:
    [info] = [s for s in daemon.json("restore", "list") if s["id"] == session_id]
    return dict(info)


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha(data) for name, data in files.items()}


def _wait_mounted(vm: GuestVM) -> None:
    """Until the guest's init says /data is mounted (its console, polled every POLL s)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while "guest: /data mounted" not in vm.console_text():
        assert time.monotonic() < deadline, f"/data not mounted\n{vm.console_text()}"
        time.sleep(POLL)


def _guest_manifest(vm: GuestVM) -> dict[str, str]:
    """Name → sha256 of every file in /data, as the guest reads them from its disk."""
    assert vm.agent is not None
    out = vm.agent.check(
        "echo 3 > /proc/sys/vm/drop_caches && cd /data && for f in *; do "
        'if [ -f "$f" ]; then sha256sum "$f" || exit 1; fi; done'
    )
    return {name: digest for digest, name in (line.split() for line in out.splitlines())}


def _check_image(image: Path, raw: Path, expected: dict[str, bytes], *, clean: bool) -> None:
    """``image`` (any format, read as raw) passes e2fsck and holds exactly ``expected``."""
    run([require_tool("qemu-img"), "convert", "-O", "raw", str(image), str(raw)], timeout=120)
    checked = check_consistent(raw, clean=clean)
    assert regular_files(checked) == sorted(expected), image.name
    for name, data in expected.items():
        assert sha(read_file(checked, name)) == sha(data), f"{image.name}: /{name}"
