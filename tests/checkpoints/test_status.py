"""`nbdsrv status` answers with what it knows while QEMU does not answer (stopped with
SIGSTOP), marks the VM unresponsive, and sees it recover once QEMU runs again."""

import json
import os
import signal

from nbdsrv.backends.views import CheckpointInfo, QmpVMStatus
from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD


def test_status_answers_while_qemu_is_stopped(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    before = nbdsrv.json("status")["vms"][0]
    assert before["responsive"] is True and before["disks"] == ["disk0"]
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        # The harness gives each command 60 s: a status that waits on QEMU fails here.
        status = nbdsrv.json("status")["vms"][0]
        text = nbdsrv.cli("status")
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    assert status["responsive"] is False
    assert "unresponsive" in status["error"]
    assert status["disks"] == ["disk0"] and status["checkpoints"] == ["c1"]
    assert text.returncode == 0 and "unresponsive" in text.stdout
    after = nbdsrv.json("status")["vms"][0]
    assert after["responsive"] is True and after["error"] is None, json.dumps(after)


# The control protocol's documents (docs/reference.md): their keys, in this order.
VM_STATUS_KEYS = [
    "name",
    "qmp",
    "qmp_connected",
    "responsive",
    "live_socket",
    "guest_agent",
    "guest_agent_connected",
    "error",
    "disks",
    "jobs",
    "checkpoints",
]
CHECKPOINT_KEYS = [
    "name",
    "parent",
    "created",
    "granularity",
    "disks",
    "valid",
    "reason",
    "persistent",
]


def test_status_and_checkpoint_list_keep_their_json_shape(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    status = nbdsrv.json("status")["vms"][0]
    # guest_frozen: where the daemon tracks a guest it froze (--quiesce).
    assert [k for k in status if k != "guest_frozen"] == VM_STATUS_KEYS
    assert set(status) <= set(QmpVMStatus.__annotations__)
    assert status["jobs"] == [] and status["checkpoints"] == ["c1"]
    [checkpoint] = nbdsrv.json("checkpoint", "list", "vm1")
    assert list(checkpoint) == CHECKPOINT_KEYS == list(CheckpointInfo.__annotations__)
    assert checkpoint["valid"] is True and checkpoint["persistent"] is True
