"""A daemon killed at any instant of `backup begin --from c1 --checkpoint c2` leaves every
checkpoint that existed valid and nothing behind (issue 19 §2): a begin that did not
complete leaves no checkpoint (the restart merges c2 back into c1, so "since c1" stays
exact), and an incremental backup afterwards is right by content."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess, nbdsrv_argv
from tests.harness.qsd import COPY_SCRIPT, DISK_SIZE, ExternalQSD, K, MiB
from tests.harness.waiting import wait_for
from tests.sessions.test_point_in_time import GuestVM, guest_workdir, start_daemon
from tests.sessions.test_point_in_time import leftovers as qemu_leftovers

__all__ = ["guest_workdir"]

BEGIN = ("backup", "begin", "vm1", "--from", "c1", "--checkpoint", "c2")


def bitmaps_in_qemu(vm: ExternalQSD) -> set[str]:
    assert vm.qmp is not None
    return set(vm.qmp.bitmaps("disk0"))


def leftovers(state: Path) -> list[str]:
    """Session records, scratch images and temporary files a begin may leave."""
    found = [*state.glob("vms/*/sessions/*"), *state.glob("scratch/*")]
    found += [p for p in state.rglob(".*.tmp")]
    found += [p for p in state.glob("vms/*/intent.json")]
    return sorted(str(p) for p in found)


def assert_chain_whole(vm: ExternalQSD, nbdsrv: DaemonProcess, expected: list[str]) -> None:
    listed = nbdsrv.checkpoints()
    assert [c["name"] for c in listed] == expected
    assert all(c["valid"] for c in listed), [(c["name"], c["reason"]) for c in listed]
    assert bitmaps_in_qemu(vm) == set(expected)
    assert leftovers(Path(nbdsrv.state_dir)) == []


def incremental_is_right(vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path) -> None:
    """c1 was taken on an empty disk: its full backup is zeroes. The changes since c1,
    copied onto it, must give what the disk holds now."""
    session = nbdsrv.json(*BEGIN)
    target = workdir / "incremental.raw"
    target.write_bytes(bytes(DISK_SIZE))
    subprocess.run(
        ["/usr/bin/python3", str(COPY_SCRIPT), nbdsrv.uri("vm1/disk0"),
         "qemu:dirty-bitmap:c1", str(target)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert target.read_bytes() == bytes(vm.models[0])
    nbdsrv.json("backup", "end", "vm1", session["id"])
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c1", "c2"]


@pytest.mark.parametrize(
    "fault",
    [
        "checkpoint-create:after-intent",
        "checkpoint-create:after-transaction",
        "backup-begin:after-switch",
        "backup-begin:after-exports",
        "checkpoint-create:after-commit",
        "backup-begin:after-open",
    ],
)
def test_killed_begin_leaves_no_checkpoint_and_c1_valid(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path, fault: str
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 1 * MiB)
    nbdsrv.stop()
    nbdsrv.start(fault=fault)
    assert nbdsrv.cli(*BEGIN).returncode == 1
    nbdsrv.wait_killed()
    nbdsrv.start()
    assert_chain_whole(vm, nbdsrv, ["c1"])
    vm.write(0, 0x22, 4 * MiB, 512 * K)
    incremental_is_right(vm, nbdsrv, workdir)


def test_killed_rollback_is_finished_by_the_next_start(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    """Killed again while rolling c2 back: the intent is still there, the next start
    finishes."""
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 1 * MiB)
    nbdsrv.stop()
    nbdsrv.start(fault="backup-begin:after-switch")
    assert nbdsrv.cli(*BEGIN).returncode == 1
    nbdsrv.wait_killed()
    with pytest.raises(pytest.fail.Exception):  # killed while it reconciles
        nbdsrv.start(fault="checkpoint-rollback:after-transaction")
    assert nbdsrv.returncode == -signal.SIGKILL
    nbdsrv.start()
    assert_chain_whole(vm, nbdsrv, ["c1"])
    incremental_is_right(vm, nbdsrv, workdir)


def test_leftover_temporary_files_are_removed_at_start(nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    nbdsrv.stop()
    directory = Path(nbdsrv.state_dir) / "vms" / "vm1"
    (directory / "sessions").mkdir(exist_ok=True)
    stale = [directory / ".counts.json.999999.tmp", directory / "sessions" / ".ab.json.999999.tmp"]
    for path in stale:
        path.write_text("{")
    nbdsrv.start()
    assert [p for p in stale if p.exists()] == []
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c1"]


def test_random_kills_during_begin_never_cost_the_chain(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    """SIGKILL at random instants of a begin (seeded: NBDSRV_KILL_SEED, NBDSRV_KILLS)."""
    seed = int(os.environ.get("NBDSRV_KILL_SEED", "19"))
    kills = int(os.environ.get("NBDSRV_KILLS", "12"))
    rng = random.Random(seed)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    # How long a whole begin takes here, from the client's start: the kills fall within it.
    started = time.monotonic()
    session = nbdsrv.json(*BEGIN)
    span = time.monotonic() - started
    nbdsrv.json("backup", "end", "vm1", session["id"])
    nbdsrv.json("checkpoint", "delete", "vm1", "c2")
    outcomes = {"failed": 0, "completed": 0, "confirmed, not answered": 0}
    for i in range(kills):
        vm.write(0, 0x30 + i, rng.randrange(0, DISK_SIZE // (64 * K)) * 64 * K, 64 * K)
        client = subprocess.Popen(
            nbdsrv_argv(*BEGIN, "--control", nbdsrv.control),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0, span * 1.2))
        nbdsrv.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        nbdsrv.wait_killed()
        code = client.wait(60)
        nbdsrv.start()
        names = [c["name"] for c in nbdsrv.checkpoints()]
        if code == 0:
            outcomes["completed"] += 1  # its checkpoint stays
            assert names == ["c1", "c2"], (seed, i)
        elif names == ["c1", "c2"]:
            # Killed between the session's confirmation and the answer: the begin did
            # complete in the daemon (no daemon can tell whether its answer arrived).
            outcomes["confirmed, not answered"] += 1
        else:
            outcomes["failed"] += 1
            assert names == ["c1"], (seed, i)
        if "c2" in names:
            assert all(c["valid"] for c in nbdsrv.checkpoints())
            nbdsrv.json("checkpoint", "delete", "vm1", "c2")
        assert_chain_whole(vm, nbdsrv, ["c1"])
    print(f"seed {seed}: {kills} kills, begin {span:.2f} s, outcomes {outcomes}")
    incremental_is_right(vm, nbdsrv, workdir)


@pytest.mark.parametrize(
    "fault", ["checkpoint-create:after-transaction", "backup-begin:after-switch"]
)
def test_killed_begin_on_a_running_vm_leaves_c1_valid_and_the_vm_running(
    guest_workdir: Path, fault: str
) -> None:
    """The same on a VM with vCPUs, which nbdsrv stops around the switch: the restart
    rolls c2 back on both disks and resumes the VM."""
    vm = GuestVM(guest_workdir, running=True)
    daemon, cli = start_daemon(guest_workdir, vm.qmp_path)
    try:
        cli("checkpoint", "create", "vm", "--name", "c1")
        vm.write(0, 0x11, 0, 1 * MiB)
        vm.write(1, 0x12, 0, 1 * MiB)
        assert daemon.stop() == 0
        daemon.start(fault=fault)
        begin = ("backup", "begin", "vm", "--from", "c1", "--checkpoint", "c2")
        assert daemon.cli(*begin).returncode == 1
        daemon.wait_killed()
        daemon.start()
        wait_for(lambda: qemu_leftovers(vm.qmp) == [], "the stale session to go")
        listed = cli("checkpoint", "list", "vm")
        assert [(c["name"], c["valid"]) for c in listed] == [("c1", True)], listed
        assert vm.qmp.cmd("query-status")["status"] == "running"
        session = cli(*begin)
        for disk, byte in (("vdisk0", 0x11), ("sdisk1", 0x12)):
            dirty = session["disks"][disk]["dirty_bytes"]["qemu:dirty-bitmap:c1"]
            assert dirty == 1 * MiB, (disk, byte, dirty)
        cli("backup", "end", "vm", session["id"])
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        vm.stop()


def test_random_kills_during_begin_on_a_running_vm(guest_workdir: Path) -> None:
    """The same loop on a VM with vCPUs and two disks (stopped around the switch): every
    kill leaves c1 valid, the VM running and nothing of the begin in QEMU; "since c1"
    then holds exactly the blocks written (seeded: NBDSRV_KILL_SEED, NBDSRV_KILLS)."""
    seed = int(os.environ.get("NBDSRV_KILL_SEED", "19"))
    kills = int(os.environ.get("NBDSRV_KILLS", "12"))
    rng = random.Random(seed)
    vm = GuestVM(guest_workdir, running=True)
    daemon, cli = start_daemon(guest_workdir, vm.qmp_path)
    begin = ("backup", "begin", "vm", "--from", "c1", "--checkpoint", "c2")
    try:
        cli("checkpoint", "create", "vm", "--name", "c1")
        started = time.monotonic()
        session = cli(*begin)
        span = time.monotonic() - started
        cli("backup", "end", "vm", session["id"])
        cli("checkpoint", "delete", "vm", "c2")
        written: set[int] = set()
        for i in range(kills):
            block = rng.randrange(0, DISK_SIZE // (64 * K))
            written.add(block)
            vm.write(0, 0x40 + i, block * 64 * K, 64 * K)
            client = subprocess.Popen(
                nbdsrv_argv(*begin, "--control", daemon.control),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(rng.uniform(0, span * 1.2))
            daemon.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            daemon.wait_killed()
            client.wait(60)
            daemon.start()
            wait_for(lambda: qemu_leftovers(vm.qmp) == [], "the stale session to go")
            listed = cli("checkpoint", "list", "vm")
            assert all(c["valid"] for c in listed), (seed, i, listed)
            if [c["name"] for c in listed] == ["c1", "c2"]:
                cli("checkpoint", "delete", "vm", "c2")
            else:
                assert [c["name"] for c in listed] == ["c1"], (seed, i, listed)
            assert vm.qmp.cmd("query-status")["status"] == "running", (seed, i)
            assert leftovers(guest_workdir / "state") == [], (seed, i)
        session = cli(*begin)
        dirty = session["disks"]["vdisk0"]["dirty_bytes"]["qemu:dirty-bitmap:c1"]
        assert dirty == len(written) * 64 * K, (seed, dirty, sorted(written))
        cli("backup", "end", "vm", session["id"])
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        vm.stop()
