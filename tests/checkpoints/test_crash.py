"""Crash safety: nbdsrv killed at each step of create and delete, and QEMU killed, restart into
a state that agrees with QEMU."""

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, MiB
from tests.harness.waiting import wait_for

K = 1024


def names_in_qemu(vm: ExternalQSD) -> set[str]:
    assert vm.qmp is not None
    return set(vm.qmp.bitmaps("disk0"))


@pytest.mark.parametrize(
    ("fault", "done"),
    [
        ("checkpoint-create:after-intent", False),
        ("checkpoint-create:after-transaction", True),
        ("checkpoint-create:after-commit", True),
    ],
)
def test_killed_during_create_restarts_consistent(
    vm: ExternalQSD, nbdsrv: DaemonProcess, fault: str, done: bool
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    nbdsrv.stop()
    nbdsrv.start(fault=fault)
    assert nbdsrv.cli("checkpoint", "create", "vm1", "--name", "c2").returncode == 1
    nbdsrv.wait_killed()
    nbdsrv.start()
    expected = ["c1", "c2"] if done else ["c1"]
    assert [c["name"] for c in nbdsrv.checkpoints()] == expected
    assert names_in_qemu(vm) == set(expected)
    assert all(c["valid"] for c in nbdsrv.checkpoints())
    # The chain goes on from where it is.
    vm.write(0, 0x11, 0, 64 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c3")
    assert vm.qmp is not None
    assert vm.qmp.bitmaps("disk0")[expected[-1]]["count"] == 64 * K


@pytest.mark.parametrize(
    ("fault", "done"),
    [
        ("checkpoint-delete:after-intent", False),
        ("checkpoint-delete:after-transaction", True),
        ("checkpoint-delete:after-commit", True),
    ],
)
def test_killed_during_delete_restarts_consistent(
    vm: ExternalQSD, nbdsrv: DaemonProcess, fault: str, done: bool
) -> None:
    for name in ("c1", "c2", "c3"):
        nbdsrv.json("checkpoint", "create", "vm1", "--name", name)
        vm.write(0, 0x11, 0, 64 * K)
    nbdsrv.stop()
    nbdsrv.start(fault=fault)
    assert nbdsrv.cli("checkpoint", "delete", "vm1", "c2").returncode == 1
    nbdsrv.wait_killed()
    nbdsrv.start()
    expected = ["c1", "c3"] if done else ["c1", "c2", "c3"]
    listed = nbdsrv.checkpoints()
    assert [c["name"] for c in listed] == expected
    assert names_in_qemu(vm) == set(expected)
    assert all(c["valid"] for c in listed)
    if done:
        assert listed[1]["parent"] == "c1"


def test_qemu_killed_marks_checkpoints_invalid_and_new_chain_starts(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 64 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.kill()
    vm.start()
    # nbdsrv's monitor reconnects by itself and reconciles.
    wait_for(lambda: not nbdsrv.checkpoints()[-1]["valid"], "checkpoints marked invalid")
    listed = nbdsrv.checkpoints()
    assert [c["valid"] for c in listed] == [False, False]
    assert all(c["reason"] for c in listed)
    assert "c2" in listed[1]["reason"]
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c3")
    vm.write(0, 0x22, 1 * MiB, 64 * K)
    listed = nbdsrv.checkpoints()
    assert [(c["name"], c["valid"]) for c in listed] == [
        ("c1", False),
        ("c2", False),
        ("c3", True),
    ]
    assert vm.qmp is not None
    assert vm.qmp.bitmaps("disk0")["c3"]["count"] == 64 * K
    # Invalid stays invalid across a daemon restart.
    nbdsrv.stop()
    nbdsrv.start()
    assert [c["valid"] for c in nbdsrv.checkpoints()] == [False, False, True]
