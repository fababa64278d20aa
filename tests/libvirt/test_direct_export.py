"""``direct_uri`` of a libvirt domain's session: libvirt's own pull-mode export (its
``exportbitmap`` named as nbdsrv's context), checked against nbdsrv's export of the same
session by map and by bytes — full, incremental, --bitmap-name, after a disk-only snapshot and
after a blockcommit, two disks — and gone with the session and with a restarted daemon."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.harness.tools import require_tool, run
from tests.libvirt.domains import URI, DomainFactory, MiB
from tests.libvirt.test_libvirt_vm import Nbdsrv, nbdsrv, started_vm
from tests.sessions.direct_compare import assert_direct_same_as_relay, assert_gone, socket_of

K = 1024
__all__ = ["nbdsrv"]  # the fixture


def _round(server: Nbdsrv, vm: str, workdir: Path, *args: str) -> None:
    session = server.cli("backup", "begin", vm, *args)
    for info in session["disks"].values():
        # libvirt's socket: QEMU's user's, in a directory only that user (and root) may enter.
        directory = os.stat(Path(socket_of(info["direct_uri"])).parent)
        assert stat.S_IMODE(directory.st_mode) == 0o700
    assert_direct_same_as_relay(session, workdir, private=False)
    server.cli("backup", "end", vm, session["id"])
    for info in session["disks"].values():
        assert_gone(info["direct_uri"])


def test_libvirt_direct_export_is_the_relay_s_twin(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    virsh = [require_tool("virsh"), "-c", URI]
    domain.write("vda", 0x11, 0, 1 * MiB)
    domain.write("sda", 0x12, 3 * MiB, 256 * K)
    _round(nbdsrv, vm, domains.dir, "--checkpoint", "c0")
    domain.write("vda", 0x21, 2 * MiB, 64 * K)
    domain.write("sda", 0x22, 0, 128 * K)
    _round(nbdsrv, vm, domains.dir, "--from", "c0", "--checkpoint", "c1")
    domain.write("vda", 0x31, 5 * MiB, 64 * K)
    _round(nbdsrv, vm, domains.dir, "--from", "c0", "--bitmap-name", "nm", "--no-checkpoint")
    run([*virsh, "snapshot-create-as", vm, "s1", "--disk-only"])
    domain.write("sda", 0x41, 6 * MiB, 64 * K)
    _round(nbdsrv, vm, domains.dir, "--from", "c0", "--checkpoint", "c2")
    for target in domain.disks:
        run([*virsh, "blockcommit", vm, target, "--active", "--pivot"], timeout=60)
    domain.write("vda", 0x51, 7 * MiB, 64 * K)
    _round(nbdsrv, vm, domains.dir, "--from", "c1", "--no-checkpoint")
    # A daemon killed mid-session: the next one ends libvirt's job, and its export goes.
    session = nbdsrv.cli("backup", "begin", vm, "--from", "c2", "--no-checkpoint")
    nbdsrv.kill_and_restart()
    domain.wait_no_backup_job()
    for info in session["disks"].values():
        assert_gone(info["direct_uri"])
