"""`nbdsrv status` answers with what it knows while QEMU does not answer (stopped with
SIGSTOP), marks the VM unresponsive, and sees it recover once QEMU runs again."""

import json
import os
import signal

from tests.tools import DaemonProcess
from tests.vmharness import ExternalQSD


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
