"""What `backup list` tells an operator about a running session, and `--quiesce` refusals
when no guest agent answers (the quiesced path itself runs against a real guest in
tests/guest)."""

import socket
import subprocess
from pathlib import Path

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import COPY_SCRIPT, ExternalQSD, MiB, attached_daemon
from tests.harness.tools import require_tool
from tests.harness.waiting import wait_for


def one_session(nbdsrv: DaemonProcess) -> dict:  # type: ignore[type-arg]
    sessions = nbdsrv.json("backup", "list", "vm1")
    assert len(sessions) == 1
    return dict(sessions[0])


def test_backup_list_reports_progress(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 1 * MiB)
    vm.write(0, 0x22, 4 * MiB, 512 * 1024)
    session = nbdsrv.json("backup", "begin", "vm1", "--from", "c1", "--checkpoint", "c2")
    listed = one_session(nbdsrv)
    assert listed["id"] == session["id"] and listed["state"] == "running"
    assert listed["started"] and listed["quiesced"] is False
    disk = listed["disks"]["disk0"]
    assert disk["size"] == vm.models[0].__len__()
    assert disk["dirty_bytes"] == {"qemu:dirty-bitmap:c1": 1 * MiB + 512 * 1024}
    assert disk["bytes_read"] == 0 and disk["clients"] == 0
    assert listed["scratch_bytes"] >= 0
    before = listed["scratch_bytes"]

    # Data overwritten after the point in time is copied into the scratch image first
    # (1 MiB of data under this write; the rest was never written and reads as zeroes).
    vm.write(0, 0x33, 0, 2 * MiB)
    assert one_session(nbdsrv)["scratch_bytes"] >= before + 1 * MiB

    # A client that stays connected is counted; reading the dirty extents twice counts once.
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c",
         "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); print('ok', flush=True);"
         " sys.stdin.read()",
         nbdsrv.uri("vm1/disk0")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        assert one_session(nbdsrv)["disks"]["disk0"]["clients"] == 1
        for target in ("a.raw", "b.raw"):
            subprocess.run(
                ["/usr/bin/python3", str(COPY_SCRIPT), nbdsrv.uri("vm1/disk0"),
                 "qemu:dirty-bitmap:c1", str(workdir / target)],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        assert one_session(nbdsrv)["disks"]["disk0"]["bytes_read"] == 1 * MiB + 512 * 1024
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: one_session(nbdsrv)["disks"]["disk0"]["clients"] == 0, "client gone")

    table = nbdsrv.cli("backup", "list", "vm1")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:4] == ["SESSION", "STATE", "STARTED", "DISK"]
    assert row.split()[0] == session["id"] and row.split()[-2] == "100.0"
    nbdsrv.cli("backup", "end", "vm1", session["id"])


def test_quiesce_without_an_agent_is_refused_and_does_nothing(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    message = nbdsrv.error("checkpoint", "create", "vm1", "--name", "q1", "--quiesce")
    assert "--qga vm1=" in message
    message = nbdsrv.error("backup", "begin", "vm1", "--quiesce")
    assert "guest agent" in message
    assert nbdsrv.checkpoints() == []
    assert nbdsrv.json("backup", "list", "vm1") == []


def test_quiesce_with_a_silent_agent_is_refused_and_does_nothing(
    vm: ExternalQSD, workdir: Path
) -> None:
    """A guest agent socket nobody answers on (the agent is not running in the guest)."""
    require_tool("qemu-img")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(workdir / "qga.sock"))
    silent.listen()
    daemon = attached_daemon(workdir, vm, "--qga", f"vm1={workdir / 'qga.sock'}")
    daemon.start()
    try:
        status = daemon.json("status")
        (info,) = status["vms"]
        assert info["guest_agent_connected"] is False
        message = daemon.error("backup", "begin", "vm1", "--quiesce")
        assert "does not answer" in message
        assert daemon.checkpoints() == []
        assert daemon.json("backup", "list", "vm1") == []
        assert not list((workdir / "state").rglob("*.qcow2"))
        assert not (workdir / "state" / "vms" / "vm1" / "frozen.json").exists()
    finally:
        daemon.stop()
        silent.close()


def test_scratch_limit_breaks_the_session_not_the_guest(vm: ExternalQSD, workdir: Path) -> None:
    daemon = attached_daemon(workdir, vm, "--scratch-limit", str(1 * MiB))
    daemon.start()
    try:
        vm.write(0, 0x11, 0, 4 * MiB)
        session = daemon.json("backup", "begin", "vm1", "--no-checkpoint")
        # Overwriting old data after the point in time fills the scratch image past 1 MiB;
        # the writes themselves succeed (vm.write checks qemu-io's result).
        vm.write(0, 0x22, 0, 4 * MiB)
        wait_for(lambda: one_session(daemon)["state"] == "failed", "the session to break")
        listed = one_session(daemon)
        assert "--scratch-limit" in listed["error"]
        read = subprocess.run(
            [require_tool("nbdcopy"), daemon.uri("vm1/disk0"), str(workdir / "x.raw")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert read.returncode != 0 and "Input/output error" in read.stderr, read.stderr
        vm.write(0, 0x33, 0, 4 * MiB)  # the guest goes on
        daemon.cli("backup", "end", "vm1", session["id"])
        assert daemon.json("backup", "list", "vm1") == []
        assert not list((workdir / "state").rglob("*.qcow2"))
    finally:
        daemon.stop()
