"""A guest is never left frozen: a thaw the agent does not confirm (an error, no answer, a
daemon killed between freeze and thaw) fails the command in one line, leaves no session and
no checkpoint, keeps the frozen marker, and the daemon (or a restarted one) retries the thaw
until the agent confirms it, with `status` showing ``guest_frozen`` meanwhile. The agent is
tests/reliability/fake_agent.py; the point in time is a real QSD's."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, attached_daemon
from tests.harness.waiting import wait_for
from tests.reliability.fake_agent import FakeAgent

QUIESCED_COMMANDS = {
    "backup begin": ("backup", "begin", "vm1", "--quiesce", "--checkpoint", "c1"),
    "checkpoint create": ("checkpoint", "create", "vm1", "--quiesce", "--name", "c1"),
}


@pytest.fixture
def agent(workdir: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(workdir / "qga.sock")
    yield fake
    fake.close()


@pytest.fixture
def daemon(workdir: Path, vm: ExternalQSD, agent: FakeAgent) -> Iterator[DaemonProcess]:
    process = attached_daemon(workdir, vm, "--qga", f"vm1={agent.path}")
    process.start()
    try:
        yield process
        process.stop()
    finally:
        process.kill()


def guest_frozen(daemon: DaemonProcess) -> bool:
    (info,) = daemon.status()["vms"]
    return bool(info["guest_frozen"])


def marker(workdir: Path) -> Path:
    return workdir / "state" / "vms" / "vm1" / "frozen.json"


def assert_left_nothing(daemon: DaemonProcess) -> None:
    assert daemon.json("backup", "list", "vm1") == []
    assert daemon.checkpoints() == []


@pytest.mark.parametrize("command", QUIESCED_COMMANDS)
@pytest.mark.parametrize("fault", ["error", "hang"])
def test_unconfirmed_thaw_fails_and_is_retried_until_confirmed(
    daemon: DaemonProcess, agent: FakeAgent, workdir: Path, command: str, fault: str
) -> None:
    agent.thaw = fault
    message = daemon.error(*QUIESCED_COMMANDS[command])
    assert "may still be frozen" in message
    assert agent.frozen
    assert_left_nothing(daemon)
    assert guest_frozen(daemon) is True
    assert marker(workdir).exists()
    # No second freeze on a guest that may be frozen.
    assert "may still be frozen" in daemon.error(*QUIESCED_COMMANDS[command])
    failed_thaws = agent.count("guest-fsfreeze-thaw")
    wait_for(lambda: agent.count("guest-fsfreeze-thaw") > failed_thaws, "a thaw retried")

    agent.thaw = "ok"  # the agent recovers: the next retry thaws, and the marker goes
    wait_for(lambda: not guest_frozen(daemon), "guest_frozen false", timeout=60)
    assert not agent.frozen
    assert not marker(workdir).exists()
    # Quiescing works again, and its thaw is confirmed.
    assert daemon.json(*QUIESCED_COMMANDS[command])["quiesced"] is True
    assert not agent.frozen and guest_frozen(daemon) is False


def test_daemon_killed_while_frozen_thaws_after_restart(
    workdir: Path, vm: ExternalQSD, agent: FakeAgent
) -> None:
    daemon = attached_daemon(workdir, vm, "--qga", f"vm1={agent.path}")
    daemon.start(fault="quiesce:after-freeze")
    try:
        assert daemon.cli(*QUIESCED_COMMANDS["backup begin"]).returncode != 0
        daemon.wait_killed()
        assert agent.frozen and marker(workdir).exists()

        agent.thaw = "error"  # the agent is not well yet when the daemon restarts
        daemon.start()
        assert guest_frozen(daemon) is True
        wait_for(lambda: agent.count("guest-fsfreeze-thaw") >= 2, "thaw retries")
        assert agent.frozen and guest_frozen(daemon) is True

        agent.thaw = "ok"
        wait_for(lambda: not guest_frozen(daemon), "guest_frozen false", timeout=60)
        assert not agent.frozen and not marker(workdir).exists()
        assert_left_nothing(daemon)
        daemon.stop()
    finally:
        daemon.kill()


def test_oversize_agent_reply_fails_only_that_vms_agent(
    daemon: DaemonProcess, agent: FakeAgent
) -> None:
    """An agent that answers guest-sync with > 64 KiB and no delimiter: status still answers
    (its VM's agent shown not connected), and --quiesce fails in one line, doing nothing."""
    agent.oversize_sync = True
    (info,) = daemon.status()["vms"]
    assert info["guest_agent_connected"] is False and info["disks"] == ["disk0"]
    message = daemon.error(*QUIESCED_COMMANDS["backup begin"])
    assert "does not answer" in message
    assert_left_nothing(daemon)
    assert guest_frozen(daemon) is False
