"""One broken part never takes the rest down: a stopped QEMU does not hold up a metrics
scrape (answered from the daemon's own state) and makes `checkpoint list` fail at once with
its reason; idle metrics connections cannot take a descriptor-limited daemon's descriptors
from its control and NBD clients. Real QSD, real HTTP, real NBD clients."""

import contextlib
import os
import resource
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, attached_daemon, make_images
from tests.harness.tools import require_tool
from tests.harness.waiting import wait_for
from tests.reliability.fake_agent import FakeAgent

# Far below QMP's own timeouts (20-30 s): a scrape that waits on QEMU cannot make it.
SCRAPE_TIMEOUT = 5.0
DESCRIPTOR_LIMIT = 128
IDLE_CONNECTIONS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT
    ) as response:
        assert response.status == 200
        return str(response.read().decode())


def scrapes(port: int) -> bool:
    try:
        scrape(port)
    except OSError:  # over the connection limit: closed at once
        return False
    return True


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def metrics_daemon(workdir: Path, vm: ExternalQSD) -> tuple[DaemonProcess, int]:
    port = free_port()
    return attached_daemon(workdir, vm, "--metrics", f"tcp:127.0.0.1:{port}"), port


def test_scrape_and_checkpoint_list_with_qemu_stopped(vm: ExternalQSD, workdir: Path) -> None:
    daemon, port = metrics_daemon(workdir, vm)
    daemon.start()
    try:
        daemon.json("checkpoint", "create", "vm1", "--name", "c1")
        with stopped(vm.pid):
            text = scrape(port)
            assert 'nbdsrv_checkpoints{vm="vm1",valid="true"} 1' in text
            assert 'nbdsrv_guest_frozen{vm="vm1"} 0' in text
            message = daemon.error("checkpoint", "list", "vm1")
            assert "did not answer" in message and "cannot be checked now" in message
            (info,) = daemon.status()["vms"]
            assert info["responsive"] is False and info["guest_frozen"] is False
        assert [c["name"] for c in daemon.checkpoints()] == ["c1"]
        daemon.stop()
    finally:
        daemon.kill()


def test_idle_metrics_connections_leave_descriptors_for_status_and_nbd(
    vm: ExternalQSD, workdir: Path
) -> None:
    nbdinfo = require_tool("nbdinfo")
    daemon, port = metrics_daemon(workdir, vm)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, hard))
    try:
        daemon.start()  # inherits the limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        daemon.status()
        session = daemon.json("backup", "begin", "vm1", "--no-checkpoint")
        size = subprocess.run(
            [nbdinfo, "--size", daemon.uri("vm1/disk0")],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        assert int(size) == vm.models[0].__len__()
        daemon.cli("backup", "end", "vm1", session["id"])
        for conn in idle:
            conn.close()
        idle.clear()
        # Once the daemon has seen the idle ones go (their slots free), scrapes are served.
        wait_for(lambda: scrapes(port), "a scrape served")
        text = scrape(port)
        assert "nbdsrv_sessions_active 0" in text
        refused = [line for line in text.splitlines() if line.startswith("nbdsrv_metrics_conn")]
        assert refused and float(refused[0].split()[1]) > 0
        daemon.stop()
    finally:
        for conn in idle:
            conn.close()
        daemon.kill()


@pytest.fixture
def vm2(workdir: Path) -> Iterator[ExternalQSD]:
    directory = workdir / "vm2"
    directory.mkdir()
    qsd = ExternalQSD(directory, make_images(directory, "qcow2"))
    qsd.start()
    yield qsd
    qsd.close()


def test_a_stopped_qemu_and_a_hostile_agent_leave_other_vms_alone(
    vm: ExternalQSD, vm2: ExternalQSD, workdir: Path
) -> None:
    """vm1's QEMU stopped and its agent answering sync with 100 KiB and no delimiter; vm2 is
    fine: status answers for both, and vm2's commands work meanwhile."""
    agent = FakeAgent(workdir / "qga.sock")
    agent.oversize_sync = True
    daemon = attached_daemon(
        workdir,
        vm,
        "--qga",
        f"vm1={agent.path}",
        "--qmp",
        f"vm2={vm2.qmp_path}",
        "--qemu-nbd",
        f"vm2={vm2.nbd_path}",
    )
    daemon.start()
    try:
        with stopped(vm.pid):
            vms = {info["name"]: info for info in daemon.status()["vms"]}
            assert vms["vm1"]["responsive"] is False
            assert vms["vm1"]["guest_agent_connected"] is False
            assert vms["vm2"]["responsive"] is True and vms["vm2"]["disks"] == ["disk0"]
            daemon.json("checkpoint", "create", "vm2", "--name", "c1")
            assert [c["name"] for c in daemon.checkpoints("vm2")] == ["c1"]
            session = daemon.json("backup", "begin", "vm2", "--from", "c1")
            daemon.cli("backup", "end", "vm2", session["id"])
        daemon.stop()
    finally:
        daemon.kill()
        agent.close()
