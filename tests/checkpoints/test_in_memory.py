"""Checkpoints on disks that cannot store a bitmap (docs/checkpoints.md "Disks without
persistent bitmaps"), on a VM-like qemu-system-x86_64 built from ``-blockdev`` and ``-device
… id=`` options: a raw file (raw format node), a qcow2 image, and a block device given to the
guest with no format node (``driver=host_device`` on a loop device when this machine allows
one, else the same with ``driver=file`` on a raw file). Backups are checked by content
against a byte-for-byte model of every disk."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from tests.harness.checksums import sha256
from tests.harness.daemon import DaemonProcess, qmp_daemon
from tests.harness.dirs import short_tmp_dir
from tests.harness.qmp import SyncQMP
from tests.harness.qsd import COPY_SCRIPT, DISK_SIZE, ExternalQSD, K, MiB, blocks
from tests.harness.tools import require_tool, run
from tests.harness.waiting import wait_for

DISKS = ("vraw", "vqcow", "vblk")


def loop_device(image: Path) -> str | None:
    """A loop device on ``image``, or None where this machine gives none (no root, no
    /dev/loop-control in a container)."""
    losetup = shutil.which("losetup")
    if losetup is None or not os.path.exists("/dev/loop-control"):
        return None
    result = subprocess.run(
        [losetup, "--find", "--show", str(image)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None


class BlockdevVM:
    """qemu-system-x86_64 held at -S (no guest), its disks behind virtio-blk devices named
    as DISKS; writes go through the devices as a guest's would (qemu-io on the second
    monitor). ``restart`` quits it and starts a new process on the same images."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        qemu_img = require_tool("qemu-img")
        self.raw = workdir / "raw.img"
        self.qcow = workdir / "q.qcow2"
        self.blk_file = workdir / "blk.img"
        run([qemu_img, "create", "-q", "-f", "raw", str(self.raw), str(DISK_SIZE)])
        run([qemu_img, "create", "-q", "-f", "qcow2", str(self.qcow), str(DISK_SIZE)])
        run([qemu_img, "create", "-q", "-f", "raw", str(self.blk_file), str(DISK_SIZE)])
        self.loop = loop_device(self.blk_file)
        self.qmp_path = workdir / "vm.qmp"
        self.test_qmp_path = workdir / "test.qmp"
        self.pidfile = workdir / "qemu.pid"
        self.models = {disk: bytearray(DISK_SIZE) for disk in DISKS}
        self.qmp: SyncQMP | None = None
        self.start()

    def start(self) -> None:
        blk = (
            f"driver=host_device,filename={self.loop}"
            if self.loop
            else f"driver=file,filename={self.blk_file}"
        )
        for path in (self.qmp_path, self.test_qmp_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        run([
            require_tool("qemu-system-x86_64"), "-machine", "q35", "-S", "-nodefaults",
            "-display", "none",
            "-blockdev", f"driver=file,filename={self.raw},node-name=raw-file",
            "-blockdev", "driver=raw,file=raw-file,node-name=raw-fmt",
            "-device", "virtio-blk-pci,drive=raw-fmt,id=vraw",
            "-blockdev", f"driver=file,filename={self.qcow},node-name=qcow-file",
            "-blockdev", "driver=qcow2,file=qcow-file,node-name=qcow-fmt",
            "-device", "virtio-blk-pci,drive=qcow-fmt,id=vqcow",
            "-blockdev", f"{blk},node-name=blk-dev",
            "-device", "virtio-blk-pci,drive=blk-dev,id=vblk",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off",
            "-daemonize", "-pidfile", str(self.pidfile),
        ])  # fmt: skip
        wait_for(self.test_qmp_path.exists, "QEMU's monitor")
        self.qmp = SyncQMP(str(self.test_qmp_path))

    def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        assert self.qmp is not None
        self.models[disk][offset : offset + length] = bytes([pattern]) * length
        out = self.qmp.hmp(
            f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "write -P {pattern} '
            f'{offset} {length}"'
        )
        assert "error" not in out.lower() and "failed" not in out.lower(), out

    def quit(self) -> None:
        if self.qmp is not None:
            pid = int(self.pidfile.read_text())
            self.qmp.quit()
            self.qmp = None
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "QEMU to exit")

    def restart(self) -> None:
        """A new QEMU process on the same images, as after the VM was shut down and
        started again."""
        self.quit()
        self.start()

    def close(self) -> None:
        try:
            self.quit()
        except Exception:
            with contextlib.suppress(Exception):
                os.kill(int(self.pidfile.read_text()), signal.SIGKILL)
        if self.loop:
            subprocess.run(["losetup", "--detach", self.loop], check=False)


@pytest.fixture
def machine() -> Iterator[tuple[BlockdevVM, DaemonProcess, Path]]:
    with short_tmp_dir("nbdsrv-m-") as workdir:
        vm = BlockdevVM(workdir)
        daemon = qmp_daemon(workdir, vm.qmp_path)
        try:
            daemon.start()
            yield vm, daemon, workdir
            daemon.stop()
        finally:
            daemon.kill()
            vm.close()


class Backups:
    """A backup tool's copies of every disk: a full backup, then incrementals into it."""

    def __init__(self, vm: BlockdevVM, daemon: DaemonProcess, workdir: Path) -> None:
        self.vm, self.daemon, self.workdir = vm, daemon, workdir

    def target(self, disk: str) -> Path:
        return self.workdir / f"backup-{disk}.img"

    def uri(self, disk: str) -> str:
        return self.daemon.uri(f"vm/{disk}")

    def full(self, checkpoint: str) -> dict[str, Any]:
        session = self.daemon.json("backup", "begin", "vm", "--checkpoint", checkpoint)
        expected = {disk: sha256(model) for disk, model in self.vm.models.items()}
        self.vm.write("vraw", 0x7E, 0, 64 * K)  # after the point in time: in no backup
        for disk in DISKS:
            self.target(disk).unlink(missing_ok=True)
            run([require_tool("nbdcopy"), self.uri(disk), str(self.target(disk))], timeout=120)
            assert sha256(self.target(disk).read_bytes()) == expected[disk], disk
        self.end(session)
        return dict(session)

    def incremental(
        self, since: str, checkpoint: str, written: dict[str, list[tuple[int, int]]]
    ) -> None:
        """Back up what changed since ``since``; ``written``: what the test wrote since."""
        session = self.daemon.json(
            "backup", "begin", "vm", "--from", since, "--checkpoint", checkpoint
        )
        expected = {disk: sha256(model) for disk, model in self.vm.models.items()}
        self.vm.write("vblk", 0x7F, 8 * MiB, 64 * K)  # after the point in time
        context = f"qemu:dirty-bitmap:{since}"
        for disk in DISKS:
            assert session["disks"][disk]["contexts"] == ["base:allocation", context]
            out = run(
                ["/usr/bin/python3", str(COPY_SCRIPT), self.uri(disk), context,
                 str(self.target(disk))],
                timeout=120,
            )  # fmt: skip
            dirty = [tuple(x) for x in json.loads(out)]
            assert blocks(dirty) == blocks(written.get(disk, [])), disk
            assert sha256(self.target(disk).read_bytes()) == expected[disk], disk
        self.end(session)

    def end(self, session: dict[str, Any]) -> None:
        result = self.daemon.cli("backup", "end", "vm", session["id"])
        assert result.returncode == 0, result.stderr


def listed(daemon: DaemonProcess) -> list[tuple[str, bool, bool]]:
    return [(c["name"], c["valid"], c["persistent"]) for c in daemon.checkpoints("vm")]


def bitmaps_in_qemu(vm: BlockdevVM) -> dict[str, dict[str, bool]]:
    """Node → bitmap name → persistent."""
    assert vm.qmp is not None
    return {
        n["node-name"]: {b["name"]: b["persistent"] for b in n.get("dirty-bitmaps", [])}
        for n in vm.qmp.cmd("query-named-block-nodes", flat=True)
        if n.get("dirty-bitmaps")
    }


def test_mixed_vm_full_and_incrementals_and_a_daemon_restart(
    machine: tuple[BlockdevVM, DaemonProcess, Path],
) -> None:
    vm, daemon, workdir = machine
    backups = Backups(vm, daemon, workdir)
    assert sorted(daemon.status()["vms"][0]["disks"]) == sorted(DISKS)
    vm.write("vraw", 0x11, 0, 1 * MiB)
    vm.write("vqcow", 0x12, 2 * MiB, 256 * K)
    vm.write("vblk", 0x13, 4 * MiB, 128 * K)
    backups.full("c1")
    assert listed(daemon) == [("c1", True, False)]
    # The raw file and the block device hold theirs in memory, the qcow2 image in the image.
    assert bitmaps_in_qemu(vm) == {
        "raw-fmt": {"c1": False},
        "qcow-fmt": {"c1": True},
        "blk-dev": {"c1": False},
    }

    written: dict[str, list[tuple[int, int]]] = {"vraw": [(0, 64 * K)]}
    for disk, pattern, offset in [("vraw", 0x21, 3 * MiB), ("vqcow", 0x22, 5 * MiB)]:
        vm.write(disk, pattern, offset, 64 * K)
        written.setdefault(disk, []).append((offset, 64 * K))
    backups.incremental("c1", "c2", written)

    vm.write("vraw", 0x31, 6 * MiB, 64 * K)
    backups.incremental("c2", "c3", {"vraw": [(6 * MiB, 64 * K)], "vblk": [(8 * MiB, 64 * K)]})

    # Deleting the middle checkpoint keeps "since its parent" exact, in memory too.
    assert daemon.cli("checkpoint", "delete", "vm", "c2").returncode == 0
    assert listed(daemon) == [("c1", True, False), ("c3", True, False)]
    since_c1 = {
        "vraw": [(0, 64 * K), (3 * MiB, 64 * K), (6 * MiB, 64 * K)],
        "vqcow": [(5 * MiB, 64 * K)],
        "vblk": [(8 * MiB, 64 * K)],
    }
    backups.incremental("c1", "c4", since_c1)

    # nbdsrv restarts; QEMU, and the bitmaps in its memory, stay: the chain goes on.
    assert daemon.stop() == 0
    daemon.start()
    assert listed(daemon) == [("c1", True, False), ("c3", True, False), ("c4", True, False)]
    vm.write("vblk", 0x41, 12 * MiB, 64 * K)
    backups.incremental("c4", "c5", {"vblk": [(8 * MiB, 64 * K), (12 * MiB, 64 * K)]})


def test_qemu_restart_invalidates_in_memory_checkpoints_and_a_new_chain_works(
    machine: tuple[BlockdevVM, DaemonProcess, Path],
) -> None:
    vm, daemon, workdir = machine
    backups = Backups(vm, daemon, workdir)
    vm.write("vqcow", 0x51, 0, 1 * MiB)
    backups.full("c1")
    vm.write("vraw", 0x52, 1 * MiB, 64 * K)
    backups.incremental("c1", "c2", {"vraw": [(0, 64 * K), (1 * MiB, 64 * K)]})

    vm.restart()
    # nbdsrv reconnects to the new process and notices it is one.
    wait_for(lambda: not any(c["valid"] for c in daemon.checkpoints("vm")), "invalid checkpoints")
    for checkpoint in daemon.checkpoints("vm"):
        assert checkpoint["persistent"] is False
        if checkpoint["name"] == "c2":
            assert "QEMU was restarted" in checkpoint["reason"]
            assert "vraw" in checkpoint["reason"] and "vblk" in checkpoint["reason"]
            assert "vqcow" not in checkpoint["reason"]
    for name in ("c1", "c2"):
        message = daemon.error("backup", "begin", "vm", "--from", name)
        assert "QEMU was restarted" in message or "is invalid" in message
        assert "take a full backup" in message

    # A new full backup starts a new chain, exact again.
    vm.write("vblk", 0x53, 2 * MiB, 64 * K)
    backups.full("n1")
    vm.write("vqcow", 0x54, 3 * MiB, 64 * K)
    backups.incremental("n1", "n2", {"vraw": [(0, 64 * K)], "vqcow": [(3 * MiB, 64 * K)]})
    assert [(c["name"], c["valid"]) for c in daemon.checkpoints("vm")][-2:] == [
        ("n1", True),
        ("n2", True),
    ]


# -- an external snapshot on a raw disk (a qemu-storage-daemon: tests/harness/qsd.py) ----------


def _incremental(nbdsrv: DaemonProcess, since: str, name: str, target: Path) -> set[int]:
    """Back up disk0 since ``since`` into ``target``; the dirty blocks."""
    session = nbdsrv.json("backup", "begin", "vm1", "--from", since, "--checkpoint", name)
    try:
        out = run(
            ["/usr/bin/python3", str(COPY_SCRIPT), nbdsrv.uri("vm1/disk0"),
             f"qemu:dirty-bitmap:{since}", str(target)],
            timeout=120,
        )  # fmt: skip
    finally:
        assert nbdsrv.cli("backup", "end", "vm1", session["id"]).returncode == 0
    return blocks([tuple(x) for x in json.loads(out)])


@pytest.mark.parametrize("vm", [("raw",)], indirect=True)
def test_qcow2_overlay_on_a_raw_disk_holds_persistent_bitmaps(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    target = workdir / "backup.img"
    vm.write(0, 0x10, 0, 1 * MiB)
    session = nbdsrv.json("backup", "begin", "vm1", "--checkpoint", "c1")
    run([require_tool("nbdcopy"), nbdsrv.uri("vm1/disk0"), str(target)], timeout=120)
    assert nbdsrv.cli("backup", "end", "vm1", session["id"]).returncode == 0
    vm.write(0, 0x11, 2 * MiB, 64 * K)
    overlay = nbdsrv.json("snapshot", "create", "vm1")["overlays"]["disk0"]
    vm.write(0, 0x12, 3 * MiB, 64 * K)
    # c1 now lies on the raw base (in memory) and on the overlay (in the image).
    assert _incremental(nbdsrv, "c1", "c2", target) == blocks(
        [(2 * MiB, 64 * K), (3 * MiB, 64 * K)]
    )
    assert sha256(target.read_bytes()) == sha256(vm.models[0])
    assert [(c["name"], c["persistent"]) for c in nbdsrv.checkpoints()] == [
        ("c1", False),
        ("c2", True),
    ]

    # QEMU restarts on the overlay: c1 had bits in memory, c2 lies wholly in the overlay.
    vm.write(0, 0x13, 4 * MiB, 64 * K)
    vm.stop()
    vm.images[0] = Path(overlay)
    vm.start()
    wait_for(lambda: not nbdsrv.checkpoints()[0]["valid"], "c1 to become invalid")
    first, second = nbdsrv.checkpoints()
    assert "QEMU was restarted" in first["reason"]
    assert (second["name"], second["valid"]) == ("c2", True)
    assert "QEMU was restarted" in nbdsrv.error("backup", "begin", "vm1", "--from", "c1")
    assert _incremental(nbdsrv, "c2", "c3", target) == blocks([(4 * MiB, 64 * K)])
    assert sha256(target.read_bytes()) == sha256(vm.models[0])

    # Committed into the raw base, the bitmaps are in memory again (and exact).
    vm.write(0, 0x14, 5 * MiB, 64 * K)
    nbdsrv.json("snapshot", "commit", "vm1")
    vm.write(0, 0x15, 6 * MiB, 64 * K)
    assert [(c["name"], c["valid"], c["persistent"]) for c in nbdsrv.checkpoints()][1:] == [
        ("c2", True, False),
        ("c3", True, False),
    ]
    assert _incremental(nbdsrv, "c3", "c4", target) == blocks(
        [(5 * MiB, 64 * K), (6 * MiB, 64 * K)]
    )
    assert sha256(target.read_bytes()) == sha256(vm.models[0])


# -- third parties and restarts behind nbdsrv's back ------------------------------------------


@pytest.mark.parametrize("vm", [("raw",)], indirect=True)
@pytest.mark.parametrize(
    "change",
    [
        [("block-dirty-bitmap-clear", {"name": "c1"})],
        [
            ("block-dirty-bitmap-remove", {"name": "c1"}),
            ("block-dirty-bitmap-add", {"name": "c1", "persistent": False}),
        ],
    ],
    ids=["clear", "remove-add"],
)
def test_third_party_changes_to_an_in_memory_bitmap_are_seen(
    vm: ExternalQSD, nbdsrv: DaemonProcess, change: list[tuple[str, dict[str, Any]]]
) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 1 * MiB)
    assert nbdsrv.checkpoints()[0]["valid"]  # nbdsrv saw 1 MiB dirty
    for command, arguments in change:
        vm.qmp.cmd(command, node="disk0", **arguments)
    vm.write(0, 0x12, 4 * MiB, 64 * K)
    [checkpoint] = nbdsrv.checkpoints()
    assert not checkpoint["valid"] and "lost dirty bits" in checkpoint["reason"]
    assert "lost dirty bits" in nbdsrv.error("backup", "begin", "vm1", "--from", "c1")


@pytest.mark.parametrize("vm", [("raw", "qcow2")], indirect=True)
def test_qemu_restarted_while_nbdsrv_was_down_and_a_bitmap_of_the_same_name(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    """A new process with a fresh bitmap called c1 on the raw disk: it did not see the
    writes made before it, whatever its properties; only the process tells."""
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 1 * MiB)
    assert nbdsrv.stop() == 0
    vm.stop()
    vm.start()
    assert vm.qmp is not None
    vm.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="c1", persistent=False)
    vm.write(0, 0x12, 2 * MiB, 2 * MiB)  # it grew past what nbdsrv saw: no count tells
    nbdsrv.start()
    [checkpoint] = nbdsrv.checkpoints()
    assert not checkpoint["valid"] and "QEMU was restarted" in checkpoint["reason"]
    assert "disk0" in checkpoint["reason"] and "disk1" not in checkpoint["reason"]
    message = nbdsrv.error("backup", "begin", "vm1", "--from", "c1")
    assert "QEMU was restarted" in message


def test_embedded_daemon_restart_is_a_qemu_restart(workdir: Path) -> None:
    """`--image` disks live in nbdsrv's own qemu-storage-daemon, which ends with nbdsrv:
    bitmaps in its memory do not outlive a restart of nbdsrv."""
    raw, qcow = workdir / "a.img", workdir / "b.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "raw", str(raw), "16M"])
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(qcow), "16M"])
    state, control = workdir / "state", workdir / "control.sock"
    daemon = DaemonProcess(
        ["--state-dir", str(state), "--listen", f"unix:{workdir / 'nbd.sock'}",
         "--image", f"vm={raw},{qcow}"],
        control, workdir / "daemon.log",
    )  # fmt: skip
    daemon.start()
    try:
        daemon.json("checkpoint", "create", "vm", "--name", "c1")
        assert [(c["valid"], c["persistent"]) for c in daemon.checkpoints("vm")] == [(True, False)]
        assert daemon.stop() == 0
        daemon.start()
        [checkpoint] = daemon.checkpoints("vm")
        assert not checkpoint["valid"] and "QEMU was restarted" in checkpoint["reason"]
        assert "disk0" in checkpoint["reason"] and "disk1" not in checkpoint["reason"]
        assert "QEMU was restarted" in daemon.error("backup", "begin", "vm", "--from", "c1")
        session = daemon.json("backup", "begin", "vm", "--checkpoint", "n1")
        assert daemon.cli("backup", "end", "vm", session["id"]).returncode == 0
        assert [(c["name"], c["valid"]) for c in daemon.checkpoints("vm")][-1] == ("n1", True)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def markers(vm: ExternalQSD) -> list[str]:
    assert vm.qmp is not None
    try:
        objects = vm.qmp.cmd("qom-list", path="/objects")
    except ExecuteError:  # QSD: no object was ever added
        return []
    return [o["name"] for o in objects if o["name"].startswith("nbdsrv-qemu-")]


@pytest.mark.parametrize(("vm", "marked"), [(("qcow2",), False), (("qcow2", "raw"), True)],
                         indirect=["vm"])  # fmt: skip
def test_only_a_qemu_with_disks_that_cannot_store_bitmaps_is_marked(
    vm: ExternalQSD, nbdsrv: DaemonProcess, marked: bool
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    assert len(markers(vm)) == (1 if marked else 0)
    assert nbdsrv.stop() == 0
    nbdsrv.start()
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    assert len(markers(vm)) == (1 if marked else 0)  # the same process keeps its one marker


@pytest.mark.parametrize("vm", [("raw",)], indirect=True)
@pytest.mark.parametrize(
    ("fault", "done"),
    [
        ("checkpoint-create:after-intent", False),
        ("checkpoint-create:after-transaction", True),
        ("checkpoint-delete:after-transaction", True),
    ],
)
def test_nbdsrv_killed_mid_operation_on_in_memory_bitmaps(
    vm: ExternalQSD, nbdsrv: DaemonProcess, fault: str, done: bool
) -> None:
    """QEMU keeps running: reconciliation finishes or drops the operation as for qcow2, and
    the checkpoints it keeps belong to the same process (still valid)."""
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 64 * K)
    if fault.startswith("checkpoint-delete"):
        nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
        vm.write(0, 0x12, 1 * MiB, 64 * K)
    assert nbdsrv.stop() == 0
    nbdsrv.start(fault=fault)
    if fault.startswith("checkpoint-delete"):
        assert nbdsrv.cli("checkpoint", "delete", "vm1", "c2").returncode == 1
        expected = ["c1"] if done else ["c1", "c2"]
    else:
        assert nbdsrv.cli("checkpoint", "create", "vm1", "--name", "c2").returncode == 1
        expected = ["c1", "c2"] if done else ["c1"]
    nbdsrv.wait_killed()
    nbdsrv.start()
    listed = nbdsrv.checkpoints()
    assert [(c["name"], c["valid"], c["persistent"]) for c in listed] == [
        (name, True, False) for name in expected
    ]
    assert set(vm.qmp.bitmaps("disk0")) == set(expected)
    if fault.startswith("checkpoint-delete"):
        # c2's bits went into c1, still in memory: "since c1" holds both writes.
        assert vm.qmp.bitmaps("disk0")["c1"]["count"] == 128 * K


def test_snapshot_and_commit_on_every_kind_of_disk(
    machine: tuple[BlockdevVM, DaemonProcess, Path],
) -> None:
    """The block device with no format node gets a qcow2 overlay too (backing format raw),
    and the commit puts every disk back on its own image with exact checkpoints."""
    vm, daemon, workdir = machine
    backups = Backups(vm, daemon, workdir)
    vm.write("vblk", 0x61, 0, 1 * MiB)
    backups.full("c1")
    overlays = daemon.json("snapshot", "create", "vm")["overlays"]
    assert sorted(overlays) == sorted(DISKS)
    vm.write("vblk", 0x62, 2 * MiB, 64 * K)
    vm.write("vqcow", 0x63, 3 * MiB, 64 * K)
    backups.incremental(
        "c1", "c2",
        {"vraw": [(0, 64 * K)], "vblk": [(2 * MiB, 64 * K)], "vqcow": [(3 * MiB, 64 * K)]},
    )  # fmt: skip
    # c2 lies wholly in the overlays: persistent.
    assert listed(daemon) == [("c1", True, False), ("c2", True, True)]
    vm.write("vraw", 0x64, 4 * MiB, 64 * K)
    daemon.json("snapshot", "commit", "vm")
    assert not any(Path(f).exists() for f in overlays.values())
    assert listed(daemon) == [("c1", True, False), ("c2", True, False)]
    backups.incremental(
        "c1", "c3",
        {"vraw": [(0, 64 * K), (4 * MiB, 64 * K)], "vblk": [(2 * MiB, 64 * K), (8 * MiB, 64 * K)],
         "vqcow": [(3 * MiB, 64 * K)]},
    )  # fmt: skip
