"""``direct_uri``: QEMU's own export of a session's point in time, beside the relay. For
each kind of session (full, incremental, --all-checkpoints, --bitmap-name, after an external
snapshot and after a commit, two disks) it offers the relay's contexts, maps each the same
and reads the same bytes (real nbdinfo and nbdcopy on both); it goes with the session and
with a daemon restart; a broken point in time fails its reads too.

VMs: a VM-like qemu-system-x86_64 (``-blockdev`` + ``-device …,id=``) attached with --qmp
(nbdsrv's own NBD server in QEMU), a qemu-storage-daemon whose NBD server nbdsrv is given
with --qemu-nbd, and the embedded default (--image)."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import DaemonProcess, qmp_daemon
from tests.harness.qemu_vm import QemuSystem, running_vm
from tests.harness.qsd import ExternalQSD, K, MiB, attached_daemon
from tests.harness.tools import require_tool, run, run_result
from tests.harness.waiting import wait_for
from tests.sessions.direct_compare import assert_direct_same_as_relay, assert_gone


class BlockdevVM(QemuSystem):
    """q35 held at -S, two qcow2 disks as ``-blockdev`` nodes behind virtio-blk-pci devices
    ``vdisk0`` and ``vdisk1``; the test writes through the devices on a second monitor."""

    def __init__(self, workdir: Path) -> None:
        self.images = [workdir / f"d{i}.qcow2" for i in range(2)]
        for image in self.images:
            run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "8M"])
        disks = []
        for i, image in enumerate(self.images):
            disks += [
                "-blockdev", f"driver=file,filename={image},node-name=file{i}",
                "-blockdev", f"driver=qcow2,file=file{i},node-name=fmt{i}",
                "-device", f"virtio-blk-pci,drive=fmt{i},id=vdisk{i}",
            ]  # fmt: skip
        super().__init__(workdir, ["-machine", "q35", "-S", "-nodefaults", "-display", "none",
                                   *disks])  # fmt: skip

    def write(self, disk: int, pattern: int, offset: int, length: int) -> None:
        """As the guest writes: through the device's BlockBackend."""
        device = f"/machine/peripheral/vdisk{disk}/virtio-backend"
        self.qemu_io(f"-d {device}", f"write -P {pattern} {offset} {length}")

    def leftovers(self) -> list[str]:
        """Anything of nbdsrv's sessions still in QEMU: nodes, exports, bitmaps."""
        nodes = self.qmp.cmd("query-named-block-nodes", flat=True)
        names = [n["node-name"] for n in nodes]
        exports = [e["id"] for e in self.qmp.cmd("query-block-exports")]
        ours = [x for x in names + exports if x.startswith("nbdsrv-")]
        bitmaps = [
            f"{n['node-name']}:{b['name']}"
            for n in nodes
            for b in n.get("dirty-bitmaps", [])
            if b.get("name") and not b.get("persistent")
        ]
        return ours + bitmaps


@pytest.fixture
def blockdev_vm() -> Iterator[tuple[BlockdevVM, Path]]:
    with running_vm(BlockdevVM, "nbdsrv-d-") as (vm, workdir):
        yield vm, workdir


def _round(daemon: DaemonProcess, workdir: Path, vm: str, *args: str) -> dict[str, Any]:
    """Begin a session, check direct against relay, end it: its direct exports are gone."""
    session = dict(daemon.json("backup", "begin", vm, *args))
    direct_uris = [d["direct_uri"] for d in session["disks"].values()]
    listed = daemon.json("backup", "list", vm)
    assert [d["direct_uri"] for d in listed[0]["disks"].values()] == direct_uris
    [status] = daemon.status()["sessions"]
    assert [d["direct_uri"] for d in status["disks"].values()] == direct_uris
    assert_direct_same_as_relay(session, workdir)
    result = daemon.cli("backup", "end", vm, session["id"])
    assert result.returncode == 0, result.stderr
    for info in session["disks"].values():
        assert_gone(info["direct_uri"])
    return session


def test_qmp_vm_direct_export_is_the_relay_s_twin(
    blockdev_vm: tuple[BlockdevVM, Path],
) -> None:
    vm, workdir = blockdev_vm
    daemon = qmp_daemon(workdir, vm.qmp_path)
    daemon.start()
    try:
        vm.write(0, 0x11, 0, 1 * MiB)
        vm.write(1, 0x12, 512 * K, 256 * K)
        full = _round(daemon, workdir, "vm", "--checkpoint", "c1")
        assert full["disks"]["vdisk0"]["contexts"] == ["base:allocation"]
        vm.write(0, 0x21, 1 * MiB, 64 * K)
        vm.write(1, 0x22, 0, 64 * K)
        daemon.json("checkpoint", "create", "vm", "--name", "c2", "--granularity", "131072")
        vm.write(0, 0x31, 3 * MiB, 192 * K)
        session = dict(daemon.json("backup", "begin", "vm", "--from", "c1", "--checkpoint", "c3"))
        vm.write(0, 0x41, 0, 4 * MiB)  # after the point in time: neither export shows it
        vm.write(1, 0x42, 0, 4 * MiB)
        assert_direct_same_as_relay(session, workdir)
        direct = session["disks"]["vdisk0"]["direct_uri"]
        run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x11 0 64k",
             "-c", "read -P 0x21 1M 64k", "-c", "read -P 0x31 3M 192k", direct])  # fmt: skip
        daemon.cli("backup", "end", "vm", session["id"])
        assert_gone(direct)
        _round(daemon, workdir, "vm", "--all-checkpoints", "--no-checkpoint")
        named = _round(daemon, workdir, "vm", "--from", "c2", "--bitmap-name", "nm",
                       "--no-checkpoint")  # fmt: skip
        assert named["disks"]["vdisk1"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:nm"]
        # Segments across backing layers, then after the commit.
        daemon.json("snapshot", "create", "vm")
        vm.write(0, 0x51, 5 * MiB, 64 * K)
        vm.write(1, 0x52, 6 * MiB, 64 * K)
        _round(daemon, workdir, "vm", "--all-checkpoints", "--checkpoint", "c4")
        daemon.json("snapshot", "commit", "vm")
        vm.write(0, 0x61, 7 * MiB, 64 * K)
        _round(daemon, workdir, "vm", "--all-checkpoints", "--no-checkpoint")
        _round(daemon, workdir, "vm", "--from", "c3", "--no-checkpoint")
        assert vm.leftovers() == []
        # A daemon killed with a session running: the next one removes its direct exports.
        session = dict(daemon.json("backup", "begin", "vm", "--from", "c2", "--no-checkpoint"))
        daemon.kill()
        assert vm.leftovers() != []
        daemon.start()
        wait_for(lambda: vm.leftovers() == [], "the stale session's removal")
        for info in session["disks"].values():
            assert_gone(info["direct_uri"])
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_qemu_nbd_direct_export_on_the_given_server(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    """--qemu-nbd: the direct export is on the NBD server nbdsrv was given (the one QEMU
    has), beside nbdsrv's upstream export."""
    vm.write(0, 0x11, 0, 1 * MiB)
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x22, 2 * MiB, 64 * K)
    session = dict(nbdsrv.json("backup", "begin", "vm1", "--from", "c1"))
    direct = session["disks"]["disk0"]["direct_uri"]
    assert direct.endswith(f"?socket={vm.nbd_path}")
    assert_direct_same_as_relay(session, workdir)
    nbdsrv.cli("backup", "end", "vm1", session["id"])
    assert_gone(direct)


def test_broken_point_in_time_fails_direct_reads_too(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    """A copy into the scratch image fails (blkdebug): QEMU breaks the snapshot and every
    read of the direct export fails, as the relay's do, and never returns newer data; the
    guest's write succeeds. QEMU 7.2's snapshot-access answers such reads with EACCES,
    which its NBD server sends as EINVAL (the relay says EIO). As soon as nbdsrv sees the
    break it gives the point in time up, the direct export with it: a later reader is told
    the export is not there."""
    vm.write(0, 0x11, 0, 1 * MiB)
    nbdsrv.stop()
    nbdsrv.start(fault="scratch-write-error")
    session = dict(nbdsrv.json("backup", "begin", "vm1"))
    direct = session["disks"]["disk0"]["direct_uri"]
    before = run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", direct])
    assert "read 65536/65536" in before
    vm.write(0, 0x99, 0, 64 * K)
    for command in ("read 0 64k", "read 4M 64k"):
        result = run_result([require_tool("qemu-io"), "-r", "-f", "raw", "-c", command, direct])
        out = result.stdout + result.stderr
        assert "read failed: Invalid argument" in out or "not present" in out, result
        relay = run_result([require_tool("qemu-io"), "-r", "-f", "raw", "-c", command,
                            nbdsrv.uri("vm1/disk0")])  # fmt: skip
        assert "read failed: Input/output error" in relay.stdout + relay.stderr, relay
    nbdsrv.cli("backup", "end", "vm1", session["id"])
    assert_gone(direct)


def test_scratch_limit_takes_the_direct_export_away(vm: ExternalQSD, workdir: Path) -> None:
    """Past --scratch-limit nbdsrv gives the point in time up in QEMU: the direct export goes
    at once (its readers are cut, new ones are refused) and the relay answers EIO."""
    daemon = attached_daemon(workdir, vm, "--scratch-limit", str(1 * MiB))
    daemon.start()
    try:
        vm.write(0, 0x11, 0, 4 * MiB)
        session = dict(daemon.json("backup", "begin", "vm1", "--no-checkpoint"))
        direct = session["disks"]["disk0"]["direct_uri"]
        vm.write(0, 0x22, 0, 4 * MiB)
        wait_for(
            lambda: daemon.json("backup", "list", "vm1")[0]["state"] == "failed",
            "the session to break",
        )
        wait_for(lambda: _unreachable(direct), "the direct export to go")
        relay = run_result([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read 0 64k",
                            daemon.uri("vm1/disk0")])  # fmt: skip
        assert "Input/output error" in relay.stdout + relay.stderr, relay
        daemon.cli("backup", "end", "vm1", session["id"])
        assert_gone(direct)
    finally:
        daemon.stop()


def _unreachable(uri: str) -> bool:
    return run_result([require_tool("nbdinfo"), "--size", uri], timeout=60).returncode != 0


def test_embedded_vm_direct_export(tmp_path: Path) -> None:
    """--image: the direct export is on the VM's live socket (0600, the daemon's user)."""
    workdir = Path(tempfile.mkdtemp(prefix="nbdsrv-e-", dir="/tmp"))
    images = [workdir / f"e{i}.qcow2" for i in range(2)]
    for image in images:
        run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "8M"])
    daemon = DaemonProcess(
        ["--state-dir", str(workdir / "state"), "--listen", f"unix:{workdir / 'nbd.sock'}",
         "--image", f"emb={images[0]},{images[1]}"],
        workdir / "control.sock", workdir / "daemon.log",
    )  # fmt: skip
    daemon.start()
    try:
        live = daemon.status()["vms"][0]["live_socket"]

        def write(disk: int, pattern: int, offset: str, length: str) -> None:
            run([require_tool("qemu-io"), "-f", "raw", "-c",
                 f"write -P {pattern} {offset} {length}",
                 f"nbd+unix:///disk{disk}?socket={live}"])  # fmt: skip

        write(0, 0x11, "0", "1M")
        write(1, 0x12, "2M", "64k")
        _round(daemon, workdir, "emb", "--checkpoint", "c1")
        write(0, 0x21, "4M", "64k")
        daemon.json("checkpoint", "create", "emb", "--name", "c2")
        write(1, 0x22, "5M", "128k")
        session = _round(daemon, workdir, "emb", "--all-checkpoints", "--no-checkpoint")
        assert session["disks"]["disk0"]["direct_uri"].endswith(f"?socket={live}")
        _round(daemon, workdir, "emb", "--from", "c1", "--bitmap-name", "b", "--no-checkpoint")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        shutil.rmtree(workdir, ignore_errors=True)
