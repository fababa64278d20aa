"""Checkpoint and --bitmap-name names follow one rule (1-128 of letters, digits, `._+-`,
starting with a letter or digit); anything else is refused with one line and changes nothing."""

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD


def test_empty_checkpoint_name_is_refused(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    assert "bad checkpoint name ''" in nbdsrv.error("checkpoint", "create", "vm1", "--name", "")
    assert "bad checkpoint name ''" in nbdsrv.error("backup", "begin", "vm1", "--checkpoint", "")
    assert nbdsrv.checkpoints() == []
    assert nbdsrv.json("backup", "list", "vm1") == []


@pytest.mark.parametrize("name", ["../../x", "a\nb", "x" * 5000, "", ".x", "a b"])
def test_bad_bitmap_names_are_refused(vm: ExternalQSD, nbdsrv: DaemonProcess, name: str) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    error = nbdsrv.error(
        "backup", "begin", "vm1", "--from", "c1", "--no-checkpoint", "--bitmap-name", name
    )
    assert error.startswith("bad --bitmap-name"), error
    assert nbdsrv.json("backup", "list", "vm1") == []
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c1"]


def test_a_good_bitmap_name_is_the_context(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    session = nbdsrv.json(
        "backup", "begin", "vm1", "--from", "c1", "--no-checkpoint", "--bitmap-name", "backup-sda"
    )
    contexts = session["disks"]["disk0"]["contexts"]
    assert [c for c in contexts if c.startswith("qemu:dirty-bitmap:")] == [
        "qemu:dirty-bitmap:backup-sda"
    ]
    nbdsrv.cli("backup", "end", "vm1", session["id"])
