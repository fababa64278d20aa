"""No false success and no leftover checkpoint under a real libvirtd (issue 19 §2, §3).

"libvirtd down" without disturbing the shared libvirtd: nbdsrv reaches it through a unix
socket relay of the test's (``qemu+unix:///system?socket=RELAY``). Cutting the relay closes
nbdsrv's connection and refuses new ones, which is all nbdsrv can see of a libvirtd that went
away; libvirtd itself, QEMU and the backup job run on, as they do when libvirtd really stops.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirt.domains import DomainFactory, MiB
from tests.libvirt.test_libvirt_vm import Nbdsrv, copy_dirty, read_all, serving, sha, started_vm

LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"


class SocketRelay:
    """A unix socket that relays every connection to ``target``; ``cut`` closes them all
    and stops listening, ``restore`` listens again."""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self._listener: socket.socket | None = None
        self._links: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.path.unlink(missing_ok=True)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.target)
            with self._lock:
                self._links += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [])
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()


@pytest.fixture
def relay(domains: DomainFactory) -> Iterator[SocketRelay]:
    relay = SocketRelay(domains.dir / "libvirt-relay.sock", LIBVIRT_SOCKET)
    yield relay
    relay.cut()


@pytest.fixture
def relayed(domains: DomainFactory, relay: SocketRelay) -> Iterator[Nbdsrv]:
    """nbdsrv following the shared libvirtd through ``relay``."""
    relayed_uri = f"qemu+unix:///system?socket={relay.path}"
    with serving(Nbdsrv(domains.dir, relayed_uri)) as server:
        yield server


def wait_connected(nbdsrv: Nbdsrv, vm: str, connected: bool) -> None:
    deadline = time.monotonic() + 60
    while (nbdsrv.vm(vm) or {}).get("connected") != connected:
        assert time.monotonic() < deadline, nbdsrv.daemon.log()
        time.sleep(0.1)


def test_backup_end_while_libvirtd_is_down_fails_and_keeps_the_session(
    domains: DomainFactory, relayed: Nbdsrv, relay: SocketRelay
) -> None:
    domain = started_vm(domains, relayed)
    vm = domain.name
    domain.write("vda", 0x11, 0, 1 * MiB)
    session = relayed.cli("backup", "begin", vm)
    domain.write("vda", 0x22, 0, 1 * MiB)  # copied into the scratch image first
    scratch = sorted(Path(relayed.daemon.state_dir).rglob(f"{session['id']}-*.qcow2"))
    assert len(scratch) == len(domain.disks)

    relay.cut()
    wait_connected(relayed, vm, False)
    line = relayed.fails("backup", "end", vm, session["id"])
    assert "libvirt is not connected" in line and "run `backup end` again" in line
    # Nothing was given up: the session, its scratch files, libvirt's job. Its exports are
    # closed (that comes first in an end): the session says it is being ended.
    [listed] = relayed.cli("backup", "list", vm)
    assert listed["id"] == session["id"] and listed["state"] == "ending"
    assert "libvirt is not connected" in listed["error"]
    assert all(p.exists() for p in scratch)
    assert domain.dom.backupGetXMLDesc(0)

    relay.restore()
    wait_connected(relayed, vm, True)
    # The end now does its work.
    relayed.cli("backup", "end", vm, session["id"])
    domain.wait_no_backup_job()
    assert relayed.cli("backup", "list", vm) == []
    assert not any(p.exists() for p in scratch)
    again = relayed.cli("backup", "begin", vm, "--no-checkpoint")
    relayed.cli("backup", "end", vm, again["id"])


def test_killed_begin_leaves_no_libvirt_checkpoint(domains: DomainFactory, relayed: Nbdsrv) -> None:
    """Killed after libvirt made c2 but before the session confirmed it: the restarted
    daemon deletes c2 (libvirt merges it into c1), and "since c1" stays exact."""
    domain = started_vm(domains, relayed)
    vm = domain.name
    full = relayed.cli("backup", "begin", vm, "--checkpoint", "c1")
    base = domains.dir / "c1.raw"
    base.write_bytes(read_all(relayed.uri(f"{vm}/vda")))
    relayed.cli("backup", "end", vm, full["id"])
    domain.write("vda", 0x11, 0, 1 * MiB)

    relayed.daemon.stop()
    relayed.daemon.start(fault="backup-begin:after-open")
    relayed.wait_vm(vm)
    result = relayed.daemon.cli("backup", "begin", vm, "--from", "c1", "--checkpoint", "c2")
    assert result.returncode == 1
    relayed.daemon.wait_killed()
    assert {c.getName() for c in domain.dom.listAllCheckpoints()} == {"c1", "c2"}
    relayed.daemon.start()
    relayed.wait_vm(vm)
    domain.wait_no_backup_job()
    deadline = time.monotonic() + 30
    while [c["name"] for c in relayed.cli("checkpoint", "list", vm)] != ["c1"]:
        assert time.monotonic() < deadline, relayed.daemon.log()
        time.sleep(0.1)
    assert all(c["valid"] for c in relayed.cli("checkpoint", "list", vm))
    assert {c.getName() for c in domain.dom.listAllCheckpoints()} == {"c1"}
    assert not os.path.exists(domains.dir / "state" / "libvirt" / vm / "begin.json")

    domain.write("vda", 0x22, 4 * MiB, 512 * 1024)
    session = relayed.cli("backup", "begin", vm, "--from", "c1", "--checkpoint", "c2")
    copy_dirty(relayed.uri(f"{vm}/vda"), "qemu:dirty-bitmap:c1", base)
    assert sha(base.read_bytes()) == domain.disks["vda"].sha256()
    relayed.cli("backup", "end", vm, session["id"])
