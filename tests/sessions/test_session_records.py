"""A session's record stays until QEMU's side is really gone (issue 10 §2): a daemon killed
in the middle of begin — even with the VM stopped for the switch — is cleaned up and the VM
resumed by the next daemon; `backup end` while QEMU is unreachable fails and keeps the
session, its record and scratch file, and succeeds once QEMU is back (issue 19 §3)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess, nbdsrv_argv
from tests.harness.qsd import ExternalQSD, MiB
from tests.harness.tools import require_tool, run
from tests.harness.waiting import wait_for
from tests.sessions.test_point_in_time import GuestVM, guest_workdir, leftovers, start_daemon

__all__ = ["guest_workdir"]


def records(state_dir: Path) -> list[str]:
    return sorted(str(p) for p in state_dir.glob("vms/*/sessions/*.json"))


def scratch_files(state_dir: Path) -> list[str]:
    return sorted(str(p) for p in state_dir.glob("scratch/*.qcow2"))


@pytest.mark.parametrize(
    "point",
    ["backup-begin:after-filters", "backup-begin:after-switch", "backup-begin:after-exports"],
)
def test_daemon_killed_during_begin_resumes_the_vm_and_cleans_qemu(
    guest_workdir: Path, point: str
) -> None:
    vm = GuestVM(guest_workdir, running=True)
    state = guest_workdir / "state"
    daemon, cli = start_daemon(guest_workdir, vm.qmp_path, fault=point)
    try:
        vm.write(0, 0x11, 0, 1 * MiB)
        begin = subprocess.run(
            nbdsrv_argv("backup", "begin", "vm", "--no-checkpoint", "--control", daemon.control),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert begin.returncode != 0
        assert daemon.proc is not None and daemon.proc.wait(30) == -9
        # What the dead daemon left: QEMU's nodes, the record (and a stopped VM).
        assert leftovers(vm.qmp)
        assert len(records(state)) == 1
        if point == "backup-begin:after-switch":
            assert vm.qmp.cmd("query-status")["status"] == "paused"
        daemon.start()
        wait_for(lambda: records(state) == [], "the stale session record to go")
        assert leftovers(vm.qmp) == []
        assert scratch_files(state) == []
        assert vm.qmp.cmd("query-status")["status"] == "running"
        # And the next backup reads what the disk holds, by content.
        vm.write(0, 0x22, 1 * MiB, 1 * MiB)
        session = cli("backup", "begin", "vm", "--no-checkpoint")
        target = guest_workdir / "after.raw"
        run([require_tool("nbdcopy"), session["disks"]["vdisk0"]["uri"], str(target)])
        data = target.read_bytes()
        assert data[: 2 * MiB] == b"\x11" * MiB + b"\x22" * MiB
        assert data[2 * MiB :].count(0) == len(data) - 2 * MiB
        run(nbdsrv_argv("backup", "end", "vm", session["id"], "--control", daemon.control))
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        vm.stop()


def test_record_stays_until_qemu_is_back(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    state = Path(nbdsrv.state_dir)
    vm.write(0, 0x11, 0, 1 * MiB)
    session = nbdsrv.json("backup", "begin", "vm1", "--no-checkpoint")
    assert len(records(state)) == 1 and len(scratch_files(state)) == 1
    vm.kill()  # QEMU unreachable: nothing can be removed from it
    # Never "ended" for work not done (issue 19 §3): the end fails and keeps everything.
    error = nbdsrv.error("backup", "end", "vm1", session["id"])
    assert "QEMU is not connected" in error and "run `backup end` again" in error
    assert [s["id"] for s in nbdsrv.json("backup", "list", "vm1")] == [session["id"]]
    assert len(records(state)) == 1 and len(scratch_files(state)) == 1
    record = json.loads(Path(records(state)[0]).read_text())
    assert record["id"] == session["id"]
    vm.start()  # nbdsrv reconnects; the end runs again and succeeds
    wait_for(lambda: nbdsrv.status()["vms"][0]["qmp_connected"], "nbdsrv to reconnect")
    nbdsrv.json("backup", "end", "vm1", session["id"])
    assert nbdsrv.json("backup", "list", "vm1") == []
    assert records(state) == []
    assert scratch_files(state) == []
    assert vm.qmp is not None
    assert [x for x in leftovers(vm.qmp) if x != "disk0"] == []
    assert os.path.exists(vm.nbd_path)  # the QSD's own NBD server was not touched
