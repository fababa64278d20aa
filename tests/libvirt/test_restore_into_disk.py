"""``restore begin VM --disk DISK`` into a disk of a libvirt domain that is shut off: the disk
resolved through libvirt's XML, its qcow2 opened in nbdsrv's own qemu-storage-daemon with
libvirt's checkpoint bitmaps loaded, so that "changed since the newest checkpoint" shows
exactly the blocks the restore wrote, and full + that incremental rebuild the restored disk
(by sha256). Refused while the domain runs, for an unknown disk, for a disk being restored
already; QEMU's image lock keeps the domain from starting meanwhile."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.checksums import file_sha256
from tests.harness.checksums import sha256 as sha
from tests.harness.tools import SYSTEM_PATH_FIRST, require_tool, run, run_result, stop_process
from tests.libvirt.domains import URI, Domain, DomainFactory, MiB
from tests.libvirt.test_libvirt_vm import Nbdsrv, read_all, serving

K = 1024
# Written after point A (the full backup, checkpoint a), before point B (checkpoint b); the
# restore writes point A's bytes back there. 64 KiB aligned: libvirt's bitmaps have the
# qcow2 cluster size as granularity.
CHANGED = [(1 * MiB, 1 * MiB), (6 * MiB, 64 * K)]


@pytest.fixture
def nbdsrv(domains: DomainFactory) -> Iterator[Nbdsrv]:
    with serving(Nbdsrv(domains.dir)) as server:
        yield server


def dirty_ranges(uri: str, context: str) -> list[tuple[int, int]]:
    out = run([require_tool("nbdinfo"), "--json", f"--map={context}", uri])
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def write_ranges(uri: str, data: Path, ranges: list[tuple[int, int]]) -> None:
    """Write ``data``'s bytes of ``ranges`` through NBD (what an incremental restore sends)."""
    script = "\n".join(
        f"h.pwrite(open({str(data)!r}, 'rb').read()[{o}:{o + n}], {o})" for o, n in ranges
    )
    run([require_tool("nbdsh"), "-u", uri, "-c", script + "\nh.flush()"], env=SYSTEM_PATH_FIRST)


def two_points(domain: Domain, nbdsrv: Nbdsrv, workdir: Path) -> tuple[bytes, bytes]:
    """Point A (a full backup, checkpoint a) and point B (an incremental from a, checkpoint
    b, CHANGED written in between) of disk vda, each read whole through nbdsrv."""
    vm = domain.name
    domain.write("vda", 0x11, 0, 4 * MiB)
    domain.write("vda", 0x44, 6 * MiB, 2 * MiB)
    full = nbdsrv.cli("backup", "begin", vm, "--checkpoint", "a")
    a = read_all(nbdsrv.uri(f"{vm}/vda"))
    nbdsrv.cli("backup", "end", vm, full["id"])
    assert sha(a) == domain.disks["vda"].sha256()
    domain.write("vda", 0x22, *CHANGED[0])
    domain.write("vda", 0x33, *CHANGED[1])
    incremental = nbdsrv.cli("backup", "begin", vm, "--from", "a", "--checkpoint", "b")
    b = read_all(nbdsrv.uri(f"{vm}/vda"))
    nbdsrv.cli("backup", "end", vm, incremental["id"])
    assert sha(b) == domain.disks["vda"].sha256() and a != b
    (workdir / "a.raw").write_bytes(a)
    return a, b


def started_and_checked(domain: Domain, nbdsrv: Nbdsrv, a: bytes, b: bytes) -> None:
    """Start the restored domain: ``backup begin --from b`` (the newest checkpoint) shows
    exactly the restored blocks, and point B + that incremental is point A by sha256."""
    vm = domain.name
    domain.start()
    nbdsrv.wait_vm(vm)
    session = nbdsrv.cli("backup", "begin", vm, "--from", "b", "--no-checkpoint")
    uri = nbdsrv.uri(f"{vm}/vda")
    assert dirty_ranges(uri, "qemu:dirty-bitmap:b") == CHANGED
    rebuilt = bytearray(b)
    whole = read_all(uri)
    for offset, length in CHANGED:
        rebuilt[offset : offset + length] = whole[offset : offset + length]
    nbdsrv.cli("backup", "end", vm, session["id"])
    assert sha(bytes(rebuilt)) == sha(a)
    assert sha(whole) == sha(a)
    listed = nbdsrv.cli("checkpoint", "list", vm)
    assert [(c["name"], c["valid"]) for c in listed] == [("a", True), ("b", True)]


def test_restore_into_a_shut_off_domain_keeps_its_checkpoints_exact(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = domains.create(disks=(("vda", "virtio"),), persistent=True)
    vm = domain.name
    nbdsrv.wait_vm(vm)
    a, b = two_points(domain, nbdsrv, domains.dir)
    image = str(domain.disks["vda"].image)

    # Running: refused in one line, nothing begun.
    message = nbdsrv.fails("restore", "begin", vm, "--disk", "vda")
    assert message == (
        f"nbdsrv: error: VM {vm} is a libvirt domain that is running: restore into its "
        "disk only while it is shut off"
    )
    domain.dom.suspend()
    message = nbdsrv.fails("restore", "begin", vm, "--disk", "vda")
    assert message.endswith(f"VM {vm} is a libvirt domain that is paused: restore into its "
                            "disk only while it is shut off")  # fmt: skip
    domain.dom.resume()
    assert nbdsrv.cli("restore", "list") == []

    domain.shut_off()
    nbdsrv.wait_vm(vm, present=False)
    message = nbdsrv.fails("restore", "begin", vm, "--disk", "vdz")
    assert message == f"nbdsrv: error: VM {vm} has no disk 'vdz' (its disks: vda)"
    message = nbdsrv.fails("restore", "begin", "no-such-domain-xyz", "--disk", "vda")
    assert message == "nbdsrv: error: no VM named 'no-such-domain-xyz'"

    restore = nbdsrv.cli("restore", "begin", vm, "--disk", "vda")
    assert (restore["vm"], restore["disk"], restore["image"]) == (vm, "vda", image)
    assert (restore["format"], restore["size"], restore["state"]) == ("qcow2", 16 * MiB, "writable")
    assert restore["export"] == f"restore/{restore['id']}"
    message = nbdsrv.fails("restore", "begin", vm, "--disk", "vda")
    assert message == f"nbdsrv: error: {image} is being restored already (restore {restore['id']})"
    message = nbdsrv.fails("restore", "begin", "--image", image)
    assert "being restored already" in message

    # QEMU's image lock keeps the domain from starting while the restore holds the disk.
    started = run_result([require_tool("virsh"), "-c", URI, "start", vm])
    assert started.returncode != 0
    assert 'Failed to get "write" lock' in started.stderr, started.stderr
    assert not domain.is_running()

    write_ranges(nbdsrv.uri(restore["export"]), domains.dir / "a.raw", CHANGED)
    [listed] = nbdsrv.cli("restore", "list")
    assert listed["written_bytes"] == sum(n for _, n in CHANGED)
    ended = nbdsrv.cli("restore", "end", restore["id"])
    assert ended["ended"] is True
    assert nbdsrv.cli("restore", "list") == []

    started_and_checked(domain, nbdsrv, a, b)


def test_a_killed_daemon_opens_the_disk_restore_again(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    """The daemon killed mid-restore: the restarted one opens the session again (QEMU stored
    the bitmaps when nbdsrv's QSD closed the image), and nothing the restore wrote before or
    after is missing from "changed since b"."""
    domain = domains.create(disks=(("vda", "virtio"),), persistent=True)
    vm = domain.name
    nbdsrv.wait_vm(vm)
    a, b = two_points(domain, nbdsrv, domains.dir)
    domain.shut_off()
    nbdsrv.wait_vm(vm, present=False)

    restore = nbdsrv.cli("restore", "begin", vm, "--disk", "vda")
    export = nbdsrv.uri(restore["export"])
    write_ranges(export, domains.dir / "a.raw", CHANGED[:1])
    nbdsrv.kill_and_restart()
    [listed] = nbdsrv.cli("restore", "list")
    assert (listed["id"], listed["vm"], listed["disk"]) == (restore["id"], vm, "vda")
    assert listed["state"] == "writable", listed
    write_ranges(export, domains.dir / "a.raw", CHANGED[1:])
    nbdsrv.cli("restore", "end", restore["id"])

    started_and_checked(domain, nbdsrv, a, b)


def test_disks_libvirt_names_but_nbdsrv_cannot_open_are_refused(
    domains: DomainFactory, nbdsrv: Nbdsrv, libvirt_conn: Any
) -> None:
    """A defined domain never started, whose vda is a qcow2 overlay over a base image: the
    restore opens the chain its header names (unwritten blocks read as the base's), and the
    base stays as it was. Network, block and vmdk disks are refused in one line each."""
    qemu_img = require_tool("qemu-img")
    base, overlay = domains.dir / "base.qcow2", domains.dir / "overlay.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(base), str(4 * MiB)])
    run([require_tool("qemu-io"), "-f", "qcow2", "-c", f"write -P 0x5a 0 {4 * MiB}", str(base)])
    run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)])
    base_sha = file_sha256(base)
    name = f"{domains.prefix}-defined"
    disks = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{overlay}'/><target dev='vda' bus='virtio'/></disk>"
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='nbd' name='x'><host name='localhost' port='10809'/></source>"
        "<target dev='vdb' bus='virtio'/></disk>"
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        "<source dev='/dev/nbdsrv-no-such-device'/><target dev='vdc' bus='virtio'/></disk>"
        f"<disk type='file' device='disk'><driver name='qemu' type='vmdk'/>"
        f"<source file='{base}'/><target dev='vdd' bus='virtio'/></disk>"
    )
    dom = libvirt_conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices>{disks}</devices></domain>"
    )
    try:
        where = f"VM {name}"
        refused = {
            "vdb": f"disk vdb of {where} is a network disk: restore into a disk is offered for "
            "image files (qcow2 or raw) only; restore into that storage with its own tools",
            "vdc": f"disk vdc of {where} is a block disk: restore into a disk is offered for "
            "image files (qcow2 or raw) only; restore into that storage with its own tools",
            "vdd": f"disk vdd of {where} is a vmdk image: restore into a disk takes qcow2 or raw",
        }
        for target, words in refused.items():
            assert nbdsrv.fails("restore", "begin", name, "--disk", target) == (
                f"nbdsrv: error: {words}"
            )
        message = nbdsrv.fails("restore", "begin", name, "--disk", "vda", "--size", "1")
        assert "not for a libvirt domain's disk" in message
        assert nbdsrv.cli("restore", "list") == []

        restore = nbdsrv.cli("restore", "begin", name, "--disk", "vda")
        export = nbdsrv.uri(restore["export"])
        assert restore["size"] == 4 * MiB
        data = domains.dir / "restored.raw"
        data.write_bytes(bytes([0x5A]) * MiB + bytes([0x66]) * MiB + bytes([0x5A]) * (2 * MiB))
        write_ranges(export, data, [(MiB, MiB)])
        assert sha(read_all(export)) == file_sha256(data)
        nbdsrv.cli("restore", "end", restore["id"])
        assert file_sha256(base) == base_sha
        raw = domains.dir / "overlay.raw"
        run([qemu_img, "convert", "-O", "raw", str(overlay), str(raw)])
        assert file_sha256(raw) == file_sha256(data)
    finally:
        dom.undefine()


def test_live_restore_into_a_shut_off_domain(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    """``--source``: point A served read-only by qemu-nbd is live-restored into vda of the
    shut-off domain (stream into an overlay beside the image, mirror into the image with
    libvirt's bitmaps loaded); a write through restore/ID after ready stays; the mirror writes
    every block, so ``--from b`` then shows the whole disk, and it reads as A + the write."""
    domain = domains.create(disks=(("vda", "virtio"),), persistent=True)
    vm = domain.name
    nbdsrv.wait_vm(vm)
    a, b = two_points(domain, nbdsrv, domains.dir)
    image = domain.disks["vda"].image
    domain.shut_off()
    nbdsrv.wait_vm(vm, present=False)

    socket = domains.dir / "source.sock"
    source = subprocess.Popen(
        [require_tool("qemu-nbd"), "-r", "-t", "-x", "backup", "-k", str(socket), "-f", "raw",
         str(domains.dir / "a.raw")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        uri = f"nbd+unix:///backup?socket={socket}"
        restore = nbdsrv.cli("restore", "begin", vm, "--disk", "vda", "--source", uri)
        assert (restore["vm"], restore["disk"], restore["source"]) == (vm, "vda", uri)
        assert restore["state"] in ("streaming", "ready")
        while (state := nbdsrv.cli("restore", "list")[0])["state"] != "ready":
            assert state["state"] == "streaming" and time.monotonic() < deadline + 90, state
            time.sleep(0.2)
        assert state["streamed_bytes"] == 16 * MiB
        assert list(image.parent.glob(f"{image.name}.restore-*")) == []  # the overlay is gone
    finally:
        stop_process(source)
    pattern = bytes([0x5A]) * (64 * K)
    (domains.dir / "pattern.raw").write_bytes(bytes(2 * MiB) + pattern)
    write_ranges(nbdsrv.uri(restore["export"]), domains.dir / "pattern.raw", [(2 * MiB, 64 * K)])
    nbdsrv.cli("restore", "end", restore["id"])
    expected = bytearray(a)
    expected[2 * MiB : 2 * MiB + 64 * K] = pattern

    domain.start()
    nbdsrv.wait_vm(vm)
    session = nbdsrv.cli("backup", "begin", vm, "--from", "b", "--no-checkpoint")
    uri = nbdsrv.uri(f"{vm}/vda")
    assert dirty_ranges(uri, "qemu:dirty-bitmap:b") == [(0, 16 * MiB)]
    assert sha(read_all(uri)) == sha(bytes(expected))
    nbdsrv.cli("backup", "end", vm, session["id"])
    listed = nbdsrv.cli("checkpoint", "list", vm)
    assert [(c["name"], c["valid"]) for c in listed] == [("a", True), ("b", True)]
    assert b != a
