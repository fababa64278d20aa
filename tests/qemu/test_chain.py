"""Backing-chain discovery against a real qemu-storage-daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdsrv.backup.checkpoints import find_layer
from nbdsrv.qemu.chain import discover_chains, discover_disks
from nbdsrv.qemu.errors import QEMUError
from nbdsrv.qemu.storage_daemon import StorageDaemon

from .conftest import SIZE, make_image, require_tool


@pytest.fixture
async def layered(tmp_path: Path, state_dir: Path) -> AsyncIterator[StorageDaemon]:
    require_tool("qemu-storage-daemon")
    base = make_image(tmp_path / "base.qcow2", "qcow2")
    top = make_image(tmp_path / "top.qcow2", "qcow2", backing=base)
    daemon = StorageDaemon("vm", [top], state_dir)
    await daemon.start()
    yield daemon
    await daemon.stop()


async def test_a_qcow2_with_a_backing_file_shows_two_layers(
    layered: StorageDaemon, tmp_path: Path
) -> None:
    chains = await discover_chains(layered.monitor)
    assert list(chains) == ["disk0"]
    top, base = chains["disk0"]
    assert (top.node_name, top.filename, top.format) == (
        "disk0",
        str(tmp_path / "top.qcow2"),
        "qcow2",
    )
    assert (base.filename, base.format) == (str(tmp_path / "base.qcow2"), "qcow2")
    assert base.node_name != "disk0-file"
    assert (top.read_only, base.read_only) == (False, True)
    assert top.virtual_size == base.virtual_size == SIZE


async def test_layers_are_found_by_file_name(layered: StorageDaemon, tmp_path: Path) -> None:
    disks = await discover_disks(layered.monitor)
    base = disks[0].layers[1]
    assert find_layer(disks[0].layers, str(tmp_path / "base.qcow2")) == base
    assert find_layer(disks[0].layers, str(tmp_path / "." / "base.qcow2")) == base
    assert find_layer(disks[0].layers, "/nowhere.qcow2") is None


async def test_bitmaps_of_each_layer(qsd: StorageDaemon) -> None:
    await qsd.monitor.execute(
        "block-dirty-bitmap-add",
        {"node": "disk0", "name": "c1", "granularity": 131072, "persistent": True},
    )
    await qsd.monitor.execute(
        "block-dirty-bitmap-add", {"node": "disk1", "name": "t", "disabled": True}
    )
    disks = {d.id: d for d in await discover_disks(qsd.monitor)}
    c1 = disks["disk0"].top.bitmap("c1")
    t = disks["disk1"].top.bitmap("t")
    assert c1 is not None and t is not None
    assert (c1.granularity, c1.count, c1.recording, c1.persistent, c1.busy) == (
        131072,
        0,
        True,
        True,
        False,
    )
    assert (t.recording, t.persistent, t.inconsistent) == (False, False, False)
    assert disks["disk1"].top.format == "raw"


async def test_fleecing_filter_and_job_bitmaps_are_not_layers(
    qsd: StorageDaemon, tmp_path: Path
) -> None:
    monitor = qsd.monitor
    image = qsd.images[0].path
    scratch = make_image(tmp_path / "scratch.qcow2", "qcow2", backing=image)
    await monitor.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "c1"})
    await monitor.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "scratch0",
            "file": {"driver": "file", "filename": str(scratch)},
            "backing": "disk0",
        },
    )
    await monitor.transaction(
        [
            ("block-dirty-bitmap-disable", {"node": "disk0", "name": "c1"}),
            ("block-dirty-bitmap-add", {"node": "disk0", "name": "c2"}),
            (
                "blockdev-backup",
                {"job-id": "fl0", "device": "disk0", "target": "scratch0", "sync": "none"},
            ),
        ]
    )
    chains = await discover_chains(monitor)
    assert list(chains) == ["disk0", "disk1"]
    (top,) = chains["disk0"]
    assert (top.node_name, top.filename) == ("disk0", str(image))
    assert [b.name for b in top.bitmaps] == ["c2", "c1"]
    # The scratch node on request: its backing is the live disk.
    (fleece,) = await discover_disks(monitor, roots=["scratch0"])
    assert [layer.node_name for layer in fleece.layers] == ["scratch0", "disk0"]
    await monitor.execute("block-job-cancel", {"device": "fl0", "force": True})


async def test_an_unknown_root_is_a_clear_error(qsd: StorageDaemon) -> None:
    with pytest.raises(QEMUError, match=r"^QEMU has no disk or block node named nope$"):
        await discover_disks(qsd.monitor, roots=["nope"])
