"""The point in time holds, or reads fail (issue 10 §2), with real QEMU and real NBD readers:

- a third party takes a session apart from a second monitor while reads are in flight:
  every read returns the point-in-time data (checked by content) or fails with EIO;
- the scratch directory on a small tmpfs fills up: the writer's writes succeed, the session
  fails with the reason, reads get EIO;
- several disks share one point in time (a writer alternating between two disks is cut
  once), on a running VM (stop/cont) and on a qemu-storage-daemon (one reopen); the next
  checkpoint's map holds every block written after it.
"""

import contextlib
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from tests.harness.daemon import DaemonProcess, nbdsrv_argv
from tests.harness.qmp import SyncQMP
from tests.harness.qsd import DISK_SIZE, ExternalQSD, K, MiB
from tests.harness.tools import require_tool, run
from tests.harness.waiting import wait_for

READER = Path(__file__).with_name("pit_reader.py")
BLOCK = 64 * K


class GuestVM:
    """q35 with no guest code: -blockdev disks behind virtio-blk-pci (vdisk0) and scsi-hd
    (sdisk1). Writes go through the devices with HMP qemu-io, as a guest's would."""

    DEVICES = ("/machine/peripheral/vdisk0/virtio-backend", "sdisk1")

    def __init__(self, workdir: Path, running: bool) -> None:
        self.qmp_path = workdir / "vm.qmp"
        test_qmp = workdir / "test.qmp"
        self.pidfile = workdir / "qemu.pid"
        argv = [require_tool("qemu-system-x86_64"), "-machine", "q35", "-nodefaults",
                "-display", "none", "-device", "virtio-scsi-pci,id=scsi0"]  # fmt: skip
        if not running:
            argv.append("-S")
        for i in range(2):
            image = workdir / f"d{i}.qcow2"
            run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image),
                 str(DISK_SIZE)])  # fmt: skip
            argv += ["-blockdev", f"driver=file,filename={image},node-name=f{i}",
                     "-blockdev", f"driver=qcow2,file=f{i},node-name=n{i}"]  # fmt: skip
        argv += ["-device", "virtio-blk-pci,drive=n0,id=vdisk0",
                 "-device", "scsi-hd,drive=n1,id=sdisk1,bus=scsi0.0",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{test_qmp},server=on,wait=off",
                 "-daemonize", "-pidfile", str(self.pidfile)]  # fmt: skip
        run(argv)
        wait_for(test_qmp.exists, "QEMU's monitor")
        self.qmp = SyncQMP(str(test_qmp))

    def write(self, disk: int, pattern: int, offset: int, length: int) -> None:
        out = self.qmp.hmp(
            f'qemu-io -d {self.DEVICES[disk]} "write -P {pattern} {offset} {length}"'
        )
        assert "error" not in out.lower() and "failed" not in out.lower(), out

    def stop(self) -> None:
        try:
            self.qmp.quit()
        except Exception:
            subprocess.run(["kill", "-9", self.pidfile.read_text().strip()], check=False)


@pytest.fixture
def guest_workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbdsrv-p-", dir="/tmp"))
    yield path
    if not os.environ.get("KEEP"):
        subprocess.run(["rm", "-rf", str(path)], check=False)


def start_daemon(
    workdir: Path, qmp_path: Path, fault: str | None = None
) -> tuple[DaemonProcess, Callable[..., Any]]:
    control = str(workdir / "control.sock")
    daemon = DaemonProcess(
        ["--state-dir", str(workdir / "state"), "--control", control,
         "--listen", f"unix:{workdir / 'nbd.sock'}", "--qmp", f"vm={qmp_path}"],
        control, workdir / "daemon.log",
    )  # fmt: skip
    daemon.start(fault=fault)

    def cli(*args: str) -> Any:
        return json.loads(run(nbdsrv_argv(*args, "--control", control, "--json")))

    return daemon, cli


def leftovers(qmp: SyncQMP) -> list[str]:
    nodes = [n["node-name"] for n in qmp.cmd("query-named-block-nodes", flat=True)]
    exports = [e["id"] for e in qmp.cmd("query-block-exports")]
    return [x for x in nodes + exports if x.startswith("nbdsrv-")]


class Readers:
    """Reader processes hammering an export while the test does things to QEMU."""

    def __init__(self, workdir: Path, uri: str, expected: bytes, count: int = 2) -> None:
        self.stop_file = workdir / "readers.stop"
        expected_file = workdir / "expected.raw"
        expected_file.write_bytes(expected)
        ready = [workdir / f"reader{i}.ready" for i in range(count)]
        argv = ["/usr/bin/python3", str(READER), uri, str(expected_file), str(self.stop_file)]
        self.procs = [
            subprocess.Popen([*argv, str(path)], stdout=subprocess.PIPE, text=True)
            for path in ready
        ]
        wait_for(lambda: all(p.exists() for p in ready), "every reader's first good read")

    def finish(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        return [json.loads(p.communicate(timeout=60)[0]) for p in self.procs]


def judge(results: list[dict[str, Any]]) -> None:
    """No read ever returned other data; the only error is EIO; reads did happen."""
    assert all(r["wrong"] == 0 for r in results), results
    assert all(set(r["errors"]) <= {"EIO"} for r in results), results
    assert sum(r["ok"] for r in results) > 0, results
    assert sum(r["errors"].get("EIO", 0) for r in results) > 0, results


def test_vm_third_party_cannot_make_reads_see_new_data(guest_workdir: Path) -> None:
    require_tool("nbdsh")
    vm = GuestVM(guest_workdir, running=False)
    daemon, cli = start_daemon(guest_workdir, vm.qmp_path)
    try:
        vm.write(0, 0x11, 0, DISK_SIZE)
        session = cli("backup", "begin", "vm", "--no-checkpoint")
        # -S: the VM was not running, so nbdsrv must not have started it.
        assert vm.qmp.cmd("query-status")["status"] == "prelaunch"
        disk0 = next(d for d in session["disks"] if "vdisk0" in d)
        index = sorted(session["disks"]).index(disk0)  # nbdsrv names QEMU nodes by it
        uri = session["disks"][disk0]["uri"]
        readers = Readers(guest_workdir, uri, b"\x11" * DISK_SIZE)
        vm.write(0, 0x22, 0, 4 * MiB)
        nodes = [n["node-name"] for n in vm.qmp.cmd("query-named-block-nodes", flat=True)]
        cbw = next(n for n in nodes if n.startswith("nbdsrv-") and n.endswith(f"-cbw{index}"))
        acc = next(n for n in nodes if n.startswith("nbdsrv-") and n.endswith(f"-acc{index}"))
        back = {"path": GuestVM.DEVICES[0], "property": "drive", "value": "n0"}
        for command, args in [
            ("qom-set", back),
            ("blockdev-del", {"node-name": cbw}),
            ("blockdev-del", {"node-name": acc}),
        ]:
            with pytest.raises(ExecuteError):
                vm.qmp.cmd(command, **args)
        vm.write(0, 0x33, 4 * MiB, 4 * MiB)
        export = next(
            e["id"] for e in vm.qmp.cmd("query-block-exports") if e["id"].endswith(f"-{index}")
        )
        vm.qmp.cmd("block-export-del", id=export, mode="hard")
        with contextlib.suppress(ExecuteError):  # the direct export holds acc too
            vm.qmp.cmd("block-export-del", id=f"{export}-direct", mode="hard")
        wait_for(lambda: not _exported(vm.qmp, export), "the exports to go")
        # nbdsrv leaves the rest to the third party once it sees them at it (a failed session
        # normally gives its point in time up at once): two parties moving the device's drive
        # at once could make QEMU 7.2 abort, setting the drive it already has.
        vm.qmp.cmd("blockdev-del", **{"node-name": acc})
        vm.qmp.cmd("qom-set", **back)
        vm.qmp.cmd("blockdev-del", **{"node-name": cbw})
        vm.write(0, 0x44, 0, DISK_SIZE)  # live data everywhere now
        wait_for(lambda: cli("backup", "list", "vm")[0]["state"] == "failed", "session failed")
        judge(readers.finish())
        run(nbdsrv_argv("backup", "end", "vm", session["id"], "--control", daemon.control))
        assert leftovers(vm.qmp) == []
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
        vm.stop()


def test_qsd_third_party_cannot_make_reads_see_new_data(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    require_tool("nbdsh")
    vm.write(0, 0x11, 0, DISK_SIZE)
    session = nbdsrv.json("backup", "begin", "vm1", "--no-checkpoint")
    readers = Readers(workdir, nbdsrv.uri("vm1/disk0"), b"\x11" * DISK_SIZE)
    qmp = vm.qmp
    assert qmp is not None
    vm.write(0, 0x22, 0, 4 * MiB)
    nodes = [n["node-name"] for n in qmp.cmd("query-named-block-nodes", flat=True)]
    cbw = next(n for n in nodes if n.startswith("nbdsrv-") and n.endswith("-cbw0"))
    acc = next(n for n in nodes if n.startswith("nbdsrv-") and n.endswith("-acc0"))
    back = [{"driver": "throttle", "node-name": "disk0-live", "throttle-group": "nbdsrv-tg",
             "file": "disk0"}]  # fmt: skip
    with pytest.raises(ExecuteError, match="Permission conflict"):
        qmp.cmd("blockdev-reopen", options=back)
    vm.write(0, 0x33, 4 * MiB, 4 * MiB)
    export = next(e["id"] for e in qmp.cmd("query-block-exports") if e["id"].endswith("-0"))
    qmp.cmd("block-export-del", id=export, mode="hard")
    qmp.cmd("block-export-del", id=f"{export}-direct", mode="hard")  # holds acc too
    wait_for(lambda: not _exported(qmp, export), "the exports to go")
    qmp.cmd("blockdev-del", **{"node-name": acc})
    qmp.cmd("blockdev-reopen", options=back)
    qmp.cmd("blockdev-del", **{"node-name": cbw})
    vm.write(0, 0x44, 0, DISK_SIZE)
    wait_for(lambda: nbdsrv.json("backup", "list", "vm1")[0]["state"] == "failed", "failed")
    judge(readers.finish())
    assert nbdsrv.cli("backup", "end", "vm1", session["id"]).returncode == 0
    assert [x for x in leftovers(qmp) if x != "disk0"] == []


def _exported(qmp: Any, export: str) -> bool:
    """Whether QEMU still lists ``export`` or its direct twin."""
    return any(e["id"].startswith(export) for e in qmp.cmd("query-block-exports"))


@pytest.fixture
def small_tmpfs(workdir: Path) -> Iterator[Path]:
    path = workdir / "scratch"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_scratch_breaks_the_snapshot_not_the_writer(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path, small_tmpfs: Path
) -> None:
    vm.write(0, 0x11, 0, DISK_SIZE)
    nbdsrv.stop()
    nbdsrv.args += ["--scratch-dir", str(small_tmpfs)]
    nbdsrv.start()
    session = nbdsrv.json("backup", "begin", "vm1", "--no-checkpoint")
    uri = nbdsrv.uri("vm1/disk0")
    check = [require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x11 0 1M", uri]
    assert "read 1048576/1048576" in run(check)
    vm.write(0, 0x22, 0, 8 * MiB)  # 8 MiB of old data to save in 2 MiB: raises if it fails
    live = run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x22 0 8M",
                f"nbd+unix:///disk0?socket={vm.nbd_path}"])  # fmt: skip
    assert "read 8388608/8388608" in live
    wait_for(lambda: nbdsrv.json("backup", "list", "vm1")[0]["state"] == "failed", "failed")
    error = nbdsrv.json("backup", "list", "vm1")[0]["error"]
    assert f"scratch directory {small_tmpfs} is full" in error, error
    result = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert "Input/output error" in result.stdout + result.stderr
    assert nbdsrv.cli("backup", "end", "vm1", session["id"]).returncode == 0
    assert vm.qmp is not None
    assert [x for x in leftovers(vm.qmp) if x != "disk0"] == []
    assert list(small_tmpfs.iterdir()) == []


def alternate_writes(write: Callable[[int, int, int, int], None], blocks: int) -> None:
    """Block k of disk 0, then block k of disk 1, for k = 0, 1, ... (pattern k + 1)."""
    for k in range(blocks):
        for disk in (0, 1):
            write(disk, k + 1, k * BLOCK, BLOCK)


def written_prefix(data: bytes, blocks: int) -> int:
    """How many blocks from the start hold their pattern; the rest must be untouched."""
    n = 0
    while n < blocks and data[n * BLOCK : (n + 1) * BLOCK] == bytes([n + 1]) * BLOCK:
        n += 1
    assert data[n * BLOCK : blocks * BLOCK] == bytes((blocks - n) * BLOCK), "not a prefix"
    return n


def dirty_blocks(uri: str, context: str) -> set[int]:
    out = run([require_tool("nbdinfo"), "--json", f"--map={context}", uri])
    return {
        b for e in json.loads(out) if e["type"] == 1
        for b in range(e["offset"] // BLOCK, (e["offset"] + e["length"]) // BLOCK)
    }  # fmt: skip


def one_cut(
    write: Callable[[int, int, int, int], None],
    begin: Callable[[], dict[str, Any]],
    read_disk: Callable[[dict[str, Any], int], bytes],
    blocks: int,
) -> int:
    """Begin a session while a writer alternates between two disks; both disks must show the
    same cut of the writer's sequence. Returns the number of blocks of disk 0 before it."""
    writer = threading.Thread(target=alternate_writes, args=(write, blocks))
    writer.start()
    try:
        session = begin()
    finally:
        writer.join()
    n0 = written_prefix(read_disk(session, 0), blocks)
    n1 = written_prefix(read_disk(session, 1), blocks)
    assert n0 - n1 in (0, 1), (n0, n1)
    return n0


def test_running_vm_two_disks_one_point_in_time(guest_workdir: Path) -> None:
    vm = GuestVM(guest_workdir, running=True)
    daemon, cli = start_daemon(guest_workdir, vm.qmp_path)
    blocks = 120
    try:
        cli("checkpoint", "create", "vm", "--name", "c0")

        def read_disk(session: dict[str, Any], disk: int) -> bytes:
            name = sorted(session["disks"])[disk]
            target = guest_workdir / f"pit{disk}.raw"
            uri = session["disks"][name]["uri"]
            run([require_tool("nbdcopy"), uri, str(target)])
            return target.read_bytes()

        disks = {d: i for i, d in enumerate(sorted(cli("status")["vms"][0]["disks"]))}
        assert len(disks) == 2

        def write(disk: int, pattern: int, offset: int, length: int) -> None:
            device = next(d for d, i in disks.items() if i == disk)
            vm.write(0 if "vdisk0" in device else 1, pattern, offset, length)

        state: dict[str, Any] = {}

        def begin() -> dict[str, Any]:
            state["session"] = cli("backup", "begin", "vm", "--checkpoint", "c1")
            return dict(state["session"])

        n0 = one_cut(write, begin, read_disk, blocks)
        assert vm.qmp.cmd("query-status")["status"] == "running"  # nbdsrv resumed it
        run(nbdsrv_argv("backup", "end", "vm", state["session"]["id"], "--control", daemon.control))
        session = cli("backup", "begin", "vm", "--from", "c1", "--no-checkpoint")
        name = sorted(session["disks"])[0]
        uri = session["disks"][name]["uri"]
        # The writer is HMP qemu-io, which `stop` does not hold (a guest's vCPUs it does):
        # blocks written between the new bitmap and the switch may show too, none may miss.
        assert dirty_blocks(uri, "qemu:dirty-bitmap:c1") >= set(range(n0, blocks))
        assert daemon.stop() == 0
        assert leftovers(vm.qmp) == []
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
        vm.stop()


@pytest.mark.parametrize("vm", [("qcow2", "qcow2")], indirect=True)
def test_qsd_two_disks_one_point_in_time(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    blocks = 60
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c0")
    writers = [
        subprocess.Popen(
            [require_tool("qemu-io"), "-f", "raw", f"nbd+unix:///disk{i}?socket={vm.nbd_path}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]

    def write(disk: int, pattern: int, offset: int, length: int) -> None:
        proc = writers[disk]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"write -P {pattern} {offset} {length}\n")
        proc.stdin.flush()
        assert "wrote" in proc.stdout.readline()
        proc.stdout.readline()

    def read_disk(session: dict[str, Any], disk: int) -> bytes:
        target = workdir / f"pit{disk}.raw"
        run([require_tool("nbdcopy"), nbdsrv.uri(f"vm1/disk{disk}"), str(target)])
        return target.read_bytes()

    state: dict[str, Any] = {}

    def begin() -> dict[str, Any]:
        state["session"] = nbdsrv.json("backup", "begin", "vm1", "--checkpoint", "c1")
        return dict(state["session"])

    try:
        n0 = one_cut(write, begin, read_disk, blocks)
    finally:
        for proc in writers:
            proc.communicate("quit\n", timeout=30)
    assert nbdsrv.cli("backup", "end", "vm1", state["session"]["id"]).returncode == 0
    nbdsrv.json("backup", "begin", "vm1", "--from", "c1", "--no-checkpoint")
    # One reopen, no pause: the new checkpoint began a little before it (a superset).
    assert dirty_blocks(nbdsrv.uri("vm1/disk0"), "qemu:dirty-bitmap:c1") >= set(range(n0, blocks))
