"""Names nbdsrv makes inside QEMU fit QEMU's node-name rules for any disk id."""

import pytest

from nbdsrv.backends.qmp.external_snapshots import commit_job
from nbdsrv.qemu.fleece import frozen_bitmap_name
from nbdsrv.qemu.names import MAX_NODE_NAME, disk_name, qemu_name

DISK_IDS = ["disk0", "drive-virtio-disk0", "x" * 300, "/machine/peripheral/vdisk0/virtio-backend"]


@pytest.mark.parametrize("disk", DISK_IDS)
def test_every_name_fits(disk: str) -> None:
    names = [
        disk_name("nbdsrv-snap", "01234567", disk),
        commit_job("0123456789abcdef", disk),
    ]
    for name in names:
        assert len(name) <= MAX_NODE_NAME and name[0].isalpha() and "/" not in name


def test_names_are_stable_and_distinct() -> None:
    assert disk_name("p", "op", "a") == disk_name("p", "op", "a")
    assert disk_name("p", "op", "a") != disk_name("p", "op", "b")


def test_a_name_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError):
        qemu_name("nbdsrv", "x" * 40)
    with pytest.raises(ValueError):
        qemu_name("1abc")


def test_frozen_bitmap_names_stay_under_nbd_string_limit() -> None:
    assert len("qemu:dirty-bitmap:" + frozen_bitmap_name("0123456789ab", "c" * 128)) < 4096
