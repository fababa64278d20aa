"""Bitmaps changed behind nbdsrv's back, over a second QMP monitor: every change QMP lets
nbdsrv see makes the checkpoint (and every older one, whose "since" map includes it) invalid
with a reason, and `backup begin --from` it is refused with that reason. Checkpoints that do
not depend on the changed bitmap keep serving exactly the writes made since them."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import COPY_SCRIPT, ExternalQSD, K, MiB, blocks
from tests.harness.waiting import wait_for


def listed(nbdsrv: DaemonProcess) -> dict[str, dict]:  # type: ignore[type-arg]
    return {c["name"]: c for c in nbdsrv.checkpoints()}


def served_since(nbdsrv: DaemonProcess, since: str, workdir: Path) -> set[int]:
    """The blocks an incremental since ``since`` serves as changed (read with libnbd)."""
    session = nbdsrv.json("backup", "begin", "vm1", "--from", since, "--no-checkpoint")
    try:
        out = subprocess.run(
            ["/usr/bin/python3", str(COPY_SCRIPT), nbdsrv.uri("vm1/disk0"),
             f"qemu:dirty-bitmap:{since}", str(workdir / "inc.raw")],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
    finally:
        nbdsrv.cli("backup", "end", "vm1", session["id"])
    return blocks(json.loads(out))


def assert_invalid(nbdsrv: DaemonProcess, name: str, words: str) -> str:
    checkpoint = listed(nbdsrv)[name]
    assert checkpoint["valid"] is False, checkpoint
    assert words in checkpoint["reason"], checkpoint["reason"]
    refused = nbdsrv.error("backup", "begin", "vm1", "--from", name)
    assert checkpoint["reason"] in refused, refused
    return str(checkpoint["reason"])


def test_clear_of_the_recording_bitmap(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x11, 0, 1 * MiB)
    assert listed(nbdsrv)["c1"]["valid"]  # nbdsrv saw 1 MiB dirty
    vm.qmp.cmd("block-dirty-bitmap-clear", node="disk0", name="c1")
    vm.write(0, 0x12, 4 * MiB, 64 * K)  # the bitmap now holds only this write
    assert_invalid(nbdsrv, "c1", "lost")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"command": "block-dirty-bitmap-clear", "name": "c1"}, "lost dirty bits"),
        ({"command": "block-dirty-bitmap-merge", "target": "c1", "bitmaps": ["c2"]}, "frozen"),
    ],
    ids=["clear", "merge-into"],
)
def test_change_of_an_older_frozen_bitmap(
    vm: ExternalQSD,
    nbdsrv: DaemonProcess,
    workdir: Path,
    change: dict,  # type: ignore[type-arg]
    words: str,
) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c0")
    vm.write(0, 0x20, 8 * MiB, 64 * K)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x21, 0, 1 * MiB)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.write(0, 0x22, 2 * MiB, 64 * K)
    assert all(c["valid"] for c in listed(nbdsrv).values())
    command = {k: v for k, v in change.items() if k != "command"}
    vm.qmp.cmd(change["command"], node="disk0", **command)
    assert_invalid(nbdsrv, "c1", words)
    # "since c0" = c0 | c1 | c2 depends on c1: invalid too; "since c2" does not.
    assert_invalid(nbdsrv, "c0", "later checkpoint 'c1'")
    assert listed(nbdsrv)["c2"]["valid"]
    assert served_since(nbdsrv, "c2", workdir) == blocks([(2 * MiB, 64 * K)])


def test_remove_and_add_again_with_the_same_name(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x31, 0, 1 * MiB)
    assert listed(nbdsrv)["c1"]["valid"]
    vm.qmp.cmd("block-dirty-bitmap-remove", node="disk0", name="c1")
    vm.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="c1", persistent=True)
    vm.write(0, 0x32, 4 * MiB, 64 * K)
    assert_invalid(nbdsrv, "c1", "lost")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"granularity": 128 * K, "persistent": True}, "granularity"),
        ({"persistent": False}, "not persistent"),
        ({"persistent": True, "disabled": True}, "stopped recording"),
    ],
)
def test_added_again_with_other_properties(
    vm: ExternalQSD,
    nbdsrv: DaemonProcess,
    options: dict,
    words: str,  # type: ignore[type-arg]
) -> None:
    """Even with no write yet (a count of 0 before and after), what QMP shows differs."""
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.qmp.cmd("block-dirty-bitmap-remove", node="disk0", name="c1")
    vm.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="c1", **options)
    assert_invalid(nbdsrv, "c1", words)


def test_disable_write_enable_seen_while_disabled(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.qmp.cmd("block-dirty-bitmap-disable", node="disk0", name="c1")
    assert listed(nbdsrv)["c1"]["valid"] is False  # seen while disabled (a poll, a command)
    vm.write(0, 0x41, 0, 64 * K)  # recorded nowhere
    vm.qmp.cmd("block-dirty-bitmap-enable", node="disk0", name="c1")
    assert_invalid(nbdsrv, "c1", "stopped recording")  # stays invalid


def test_a_frozen_bitmap_enabled_again(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    vm.qmp.cmd("block-dirty-bitmap-enable", node="disk0", name="c1")
    assert_invalid(nbdsrv, "c1", "records writes")
    assert listed(nbdsrv)["c2"]["valid"]


def test_counts_are_remembered_across_a_daemon_restart(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    assert vm.qmp is not None
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x51, 0, 1 * MiB)
    assert listed(nbdsrv)["c1"]["valid"]
    nbdsrv.stop()
    vm.qmp.cmd("block-dirty-bitmap-clear", node="disk0", name="c1")
    vm.write(0, 0x52, 4 * MiB, 64 * K)
    nbdsrv.start()
    assert_invalid(nbdsrv, "c1", "lost")


def test_the_periodic_poll_sees_a_clear_that_later_writes_would_hide(
    vm: ExternalQSD, nbdsrv: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert vm.qmp is not None
    nbdsrv.stop()
    monkeypatch.setenv("NBDSRV_BITMAP_POLL", "0.2")
    nbdsrv.start()
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x61, 0, 1 * MiB)
    counts = Path(nbdsrv.state_dir) / "vms" / "vm1" / "counts.json"

    def seen_count() -> int:
        try:
            seen = json.loads(counts.read_text())["seen"]
        except (FileNotFoundError, ValueError):
            return -1
        return max((s["count"] for s in seen if s["bitmap"] == "c1"), default=-1)

    wait_for(lambda: seen_count() == 1 * MiB, "the poll to see 1 MiB dirty")
    vm.qmp.cmd("block-dirty-bitmap-clear", node="disk0", name="c1")
    log = nbdsrv.log_path
    wait_for(lambda: "checkpoint c1 is invalid" in log.read_text(), "the poll to see the clear")
    vm.write(0, 0x62, 2 * MiB, 2 * MiB)  # the count grows past what was seen before
    assert_invalid(nbdsrv, "c1", "lost")
    assert os.path.exists(counts)


def test_a_clear_across_a_qemu_restart(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    """QEMU restarts (cleanly: the bitmaps are saved); someone clears the bitmap on the new
    QEMU: the counts nbdsrv saw before the restart still count."""
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x71, 0, 1 * MiB)
    assert listed(nbdsrv)["c1"]["valid"]
    vm.stop()
    vm.start()
    assert vm.qmp is not None
    vm.qmp.cmd("block-dirty-bitmap-clear", node="disk0", name="c1")
    vm.write(0, 0x72, 4 * MiB, 64 * K)
    wait_for(lambda: nbdsrv.json("status")["vms"][0]["qmp_connected"], "QMP reconnect", 30)
    assert_invalid(nbdsrv, "c1", "lost")
