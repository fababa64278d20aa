"""`snapshot commit` on chains of three and four layers, with checkpoints in every layer:
each commit merges the top into the layer directly below it (never into the base), and after
each one every "since" map is exact and every point in time rebuilds by checksum."""

import os
from pathlib import Path

import pytest

from tests.harness.checksums import sha256
from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import ExternalQSD, K, MiB
from tests.harness.timeline import Timeline
from tests.harness.waiting import wait_for
from tests.snapshots.test_snapshots import layers


def timeline_of(nbdsrv: DaemonProcess, workdir: Path) -> Timeline:
    return Timeline(nbdsrv.json, nbdsrv.uri, "vm1", "disk0", workdir)


def write(vm: ExternalQSD, timeline: Timeline, pattern: int, offset: int, length: int = 64 * K):
    vm.write(0, pattern, offset, length)
    timeline.wrote(offset, length, pattern)


def build_chain(
    vm: ExternalQSD, nbdsrv: DaemonProcess, timeline: Timeline, overlays: int
) -> list[str]:
    """base ← snap1 ← … ← snapN with a checkpoint in every layer and writes around each;
    the chain's files, top first."""
    write(vm, timeline, 0x10, 0, 1 * MiB)
    timeline.full("c0")
    write(vm, timeline, 0x11, 1 * MiB)
    for i in range(1, overlays + 1):
        nbdsrv.json("snapshot", "create", "vm1")
        write(vm, timeline, 0x20 + i, (2 * i) * MiB)
        timeline.checkpoint(f"c{i}")
        # Rewrite what an older layer holds, and a block of a new region.
        write(vm, timeline, 0x40 + i, (2 * i - 1) * MiB + 64 * K)
        write(vm, timeline, 0x60 + i, 0, 32 * K)
    chain = layers(vm)
    assert len(chain) == overlays + 1
    return chain


@pytest.mark.parametrize("overlays", [2, 3])
def test_commit_repeatedly_down_to_one_layer(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path, overlays: int
) -> None:
    timeline = timeline_of(nbdsrv, workdir)
    chain = build_chain(vm, nbdsrv, timeline, overlays)
    timeline.verify("before any commit")
    base_before = sha256(Path(chain[-1]).read_bytes())
    for step in range(overlays):
        committed = nbdsrv.json("snapshot", "commit", "vm1")
        assert committed["committed"] == {"disk0": chain[0]}
        assert not os.path.exists(chain[0])
        chain = chain[1:]
        assert layers(vm) == chain, f"commit {step + 1}: the top went into the layer below"
        if len(chain) > 1:  # the base is only written by the last commit
            assert sha256(Path(chain[-1]).read_bytes()) == base_before
        write(vm, timeline, 0x80 + step, (9 + step) * MiB)
        timeline.verify(f"after commit {step + 1}")
    assert "no snapshot to commit" in nbdsrv.error("snapshot", "commit", "vm1")


def test_commit_after_qemu_restart(vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path) -> None:
    """The --qmp VM is restarted on its newest overlay: the middle layers come back read-only
    with their bitmaps, and the commit still goes into the layer below the top."""
    timeline = timeline_of(nbdsrv, workdir)
    chain = build_chain(vm, nbdsrv, timeline, 2)
    vm.stop()
    vm.images[0] = Path(chain[0])  # the VM's configuration follows its top, as libvirt's does
    vm.start()
    wait_for(lambda: nbdsrv.json("status")["vms"][0]["qmp_connected"], "QMP reconnect", 30)
    assert layers(vm) == chain
    timeline.verify("after the QEMU restart")
    for step in range(2):
        nbdsrv.json("snapshot", "commit", "vm1")
        chain = chain[1:]
        assert layers(vm) == chain
        write(vm, timeline, 0x90 + step, (12 + step) * MiB)
        timeline.verify(f"after commit {step + 1}")
