"""``nbdsrv daemon --libvirt qemu:///system`` against a real libvirtd: libvirt's checkpoints
and pull-mode backups, served as ``VM/TARGET`` on nbdsrv's own listener.

Correctness is proved by content: each point in time is rebuilt from a full backup plus the
dirty extents of each incremental, read through nbdsrv, and compared with what the test wrote
before the point in time.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness.checksums import sha256 as sha
from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import COPY_SCRIPT
from tests.harness.tools import require_tool, run, run_result
from tests.libvirt.conftest import restart_libvirtd
from tests.libvirt.domains import URI, Domain, DomainFactory, MiB

K = 1024


class Nbdsrv:
    """An nbdsrv daemon following ``qemu:///system``, listening on a unix socket."""

    def __init__(self, workdir: Path, libvirt_uri: str = URI) -> None:
        # 0700 like the default state dir: nbdsrv lets libvirt's QEMU search it.
        state = workdir / "state"
        state.mkdir(mode=0o700)
        self.control = str(state / "control.sock")
        self.socket = workdir / "nbd.sock"
        self.daemon = DaemonProcess(
            [
                "--state-dir",
                str(state),
                "--listen",
                f"unix:{self.socket}",
                "--libvirt",
                libvirt_uri,
            ],
            self.control,
            workdir / "daemon.log",
        )

    def kill_and_restart(self) -> None:
        """SIGKILL the daemon (mid-whatever) and start a new one on the same state dir."""
        self.daemon.kill()
        self.daemon = DaemonProcess(self.daemon.args, self.control, self.daemon.log_path)
        self.daemon.start()

    def cli(self, *args: str) -> Any:
        return self.daemon.json(*args)

    def fails(self, *args: str) -> str:
        """Run a command that must fail; its one line of stderr."""
        return "nbdsrv: error: " + self.daemon.error(*args)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def vm(self, name: str) -> dict[str, Any] | None:
        return next((v for v in self.daemon.status()["vms"] if v["name"] == name), None)

    def wait_vm(self, name: str, present: bool = True, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.vm(name) is not None) != present:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"VM {name} {'never appeared' if present else 'still there'}\n"
                    f"{self.daemon.log()}"
                )
            time.sleep(0.1)


@contextmanager
def serving(server: Nbdsrv) -> Iterator[Nbdsrv]:
    """``server`` started; at the end it must stop with status 0 and no traceback logged."""
    server.daemon.start()
    try:
        yield server
        assert server.daemon.stop() == 0, server.daemon.log()
        assert "Traceback" not in server.daemon.log(), server.daemon.log()
    finally:
        server.daemon.kill()


@pytest.fixture
def nbdsrv(domains: DomainFactory) -> Iterator[Nbdsrv]:
    with serving(Nbdsrv(domains.dir)) as server:
        yield server


def read_all(uri: str) -> bytes:
    return subprocess.run(
        [require_tool("nbdcopy"), uri, "-"], capture_output=True, check=True, timeout=120
    ).stdout


def copy_dirty(uri: str, context: str, target: Path) -> list[tuple[int, int]]:
    """Read only the dirty extents of ``context`` into ``target`` with libnbd."""
    out = run(["/usr/bin/python3", str(COPY_SCRIPT), uri, context, str(target)], timeout=120)
    return [(o, n) for o, n in json.loads(out)]


def started_vm(domains: DomainFactory, nbdsrv: Nbdsrv) -> Domain:
    domain = domains.create()
    nbdsrv.wait_vm(domain.name)
    return domain


def test_full_and_three_incrementals_rebuild_both_disks(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    assert nbdsrv.vm(vm)["disks"] == ["sda", "vda"]  # type: ignore[index]
    domain.write("vda", 0x11, 0, 1 * MiB)
    domain.write("sda", 0x12, 3 * MiB, 256 * K)
    backups = {t: domains.dir / f"backup-{t}.raw" for t in domain.disks}

    session = nbdsrv.cli("backup", "begin", vm, "--checkpoint", "c0")
    expected = {t: d.sha256() for t, d in domain.disks.items()}
    domain.write("vda", 0x99, 0, 64 * K)  # after the point in time: never read
    assert session["checkpoint"] == "c0" and session["from"] is None
    for target in domain.disks:
        assert session["disks"][target]["export"] == f"{vm}/{target}"
        assert session["disks"][target]["contexts"] == ["base:allocation"]
        backups[target].write_bytes(read_all(nbdsrv.uri(f"{vm}/{target}")))
        assert sha(backups[target].read_bytes()) == expected[target], target
    nbdsrv.cli("backup", "end", vm, session["id"])

    writes = [
        [("vda", 0x21, 2 * MiB, 64 * K), ("sda", 0x22, 0, 128 * K)],
        [("vda", 0x31, 2 * MiB + 32 * K, 96 * K), ("vda", 0x32, 15 * MiB, 1 * MiB)],
        [("sda", 0x41, 8 * MiB, 4 * K)],
    ]
    for n, batch in enumerate(writes, start=1):
        for target, byte, offset, length in batch:
            domain.write(target, byte, offset, length)
        session = nbdsrv.cli("backup", "begin", vm, "--from", f"c{n - 1}", "--checkpoint", f"c{n}")
        expected = {t: d.sha256() for t, d in domain.disks.items()}
        domain.write("sda", 0x77, 0, 64 * K)  # after the point in time
        context = f"qemu:dirty-bitmap:c{n - 1}"
        for target in domain.disks:
            assert session["disks"][target]["contexts"] == ["base:allocation", context]
            dirty = copy_dirty(nbdsrv.uri(f"{vm}/{target}"), context, backups[target])
            assert sha(backups[target].read_bytes()) == expected[target], (n, target, dirty)
        nbdsrv.cli("backup", "end", vm, session["id"])

    listed = nbdsrv.cli("checkpoint", "list", vm)
    assert [(c["name"], c["parent"], c["valid"]) for c in listed] == [
        ("c0", None, True), ("c1", "c0", True), ("c2", "c1", True), ("c3", "c2", True),
    ]  # fmt: skip


def test_checkpoints_made_with_virsh_are_listed_and_usable(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    virsh = require_tool("virsh")
    run([virsh, "-c", URI, "checkpoint-create-as", vm, "--name", "by-virsh"])
    created = nbdsrv.cli("checkpoint", "create", vm, "--name", "by-nbdsrv")
    assert (created["name"], created["parent"]) == ("by-nbdsrv", "by-virsh")
    listed = nbdsrv.cli("checkpoint", "list", vm)
    assert [(c["name"], c["parent"], c["valid"], c["reason"], c["persistent"]) for c in listed] == [
        ("by-virsh", None, True, None, True),
        ("by-nbdsrv", "by-virsh", True, None, True),
    ]
    domain.write("vda", 0x55, 1 * MiB, 64 * K)
    session = nbdsrv.cli("backup", "begin", vm, "--from", "by-virsh", "--no-checkpoint")
    out = run([require_tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:by-virsh",
               nbdsrv.uri(f"{vm}/vda")])  # fmt: skip
    assert [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1] == [
        (1 * MiB, 64 * K)
    ]
    nbdsrv.cli("backup", "end", vm, session["id"])
    nbdsrv.cli("checkpoint", "delete", vm, "by-nbdsrv")
    out = run([virsh, "-c", URI, "checkpoint-list", vm, "--name"])
    assert out.split() == ["by-virsh"]


def test_bitmap_name_names_the_context(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    nbdsrv.cli("checkpoint", "create", vm, "--name", "c1")
    session = nbdsrv.cli("backup", "begin", vm, "--from", "c1", "--bitmap-name", "changed")
    assert session["disks"]["vda"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:changed"]
    nbdsrv.cli("backup", "end", vm, session["id"])


def test_refusals_say_what_to_use_instead(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    nbdsrv.cli("checkpoint", "create", vm, "--name", "c1")
    line = nbdsrv.fails("backup", "begin", vm, "--from", "c1", "--all-checkpoints")
    assert "--all-checkpoints" in line and "--from" in line
    assert "virsh snapshot-create-as" in nbdsrv.fails("snapshot", "create", vm)
    assert "virsh blockcommit" in nbdsrv.fails("snapshot", "commit", vm)
    assert "--granularity" in nbdsrv.fails("checkpoint", "create", vm, "--granularity", "131072")
    # Nothing half-done: no session, no new checkpoint.
    assert nbdsrv.cli("backup", "list", vm) == []
    assert [c["name"] for c in nbdsrv.cli("checkpoint", "list", vm)] == ["c1"]


def test_domains_that_start_and_stop_are_picked_up(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = domains.create()  # after the daemon started
    nbdsrv.wait_vm(domain.name)
    domain.destroy()
    nbdsrv.wait_vm(domain.name, present=False)


def test_domain_destroyed_mid_session_gives_eio(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    domain.write("vda", 0x11, 0, 64 * K)
    session = nbdsrv.cli("backup", "begin", vm)
    uri = nbdsrv.uri(f"{vm}/vda")
    run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", uri])
    domain.destroy()
    deadline = time.monotonic() + 30
    while True:
        result = run_result([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read 0 64k", uri])
        failed = result.returncode != 0 or "error" in (result.stdout + result.stderr).lower()
        if failed:
            break
        assert time.monotonic() < deadline, "reads still succeed after the domain was destroyed"
        time.sleep(0.2)
    assert "Input/output error" in result.stdout + result.stderr
    listed = nbdsrv.cli("backup", "list", vm)
    assert [s["state"] for s in listed] == ["failed"]
    nbdsrv.cli("backup", "end", vm, session["id"])
    nbdsrv.wait_vm(vm, present=False)
    assert not list((Path(domains.dir) / "state" / "libvirt" / vm).iterdir())


def test_nbdsrv_does_not_taint_the_domain(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    nbdsrv.cli("checkpoint", "create", vm, "--name", "c1")
    session = nbdsrv.cli("backup", "begin", vm, "--from", "c1", "--checkpoint", "c2")
    read_all(nbdsrv.uri(f"{vm}/vda"))
    nbdsrv.cli("backup", "end", vm, session["id"])
    nbdsrv.cli("checkpoint", "delete", vm, "c1")
    assert domain.tainted() == []
    assert "tainted" not in domain.log()
    xml = run([require_tool("virsh"), "-c", URI, "dumpxml", vm])
    assert "qemu:commandline" not in xml


def test_invalid_checkpoint_has_libvirts_reason(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    nbdsrv.cli("checkpoint", "create", vm, "--name", "c1")
    node = _format_node(domain, "vda")
    run([require_tool("virsh"), "-c", URI, "qemu-monitor-command", vm,
         json.dumps({"execute": "block-dirty-bitmap-remove",
                     "arguments": {"node": node, "name": "c1"}})])  # fmt: skip
    [listed] = nbdsrv.cli("checkpoint", "list", vm)
    assert listed["valid"] is False
    reason = "checkpoint inconsistent: missing or broken bitmap 'c1' for disk 'vda'"
    assert listed["reason"] == reason
    line = nbdsrv.fails("backup", "begin", vm, "--from", "c1")
    assert "not valid" in line and "full backup" in line
    assert nbdsrv.cli("backup", "list", vm) == []
    line = nbdsrv.fails("checkpoint", "delete", vm, "c1")
    assert "not found in backing chain" in line and "--metadata" in line


def _format_node(domain: Domain, target: str) -> str:
    """The qcow2 node libvirt made for a disk (``libvirt-N-format``)."""
    out = run([require_tool("virsh"), "-c", URI, "qemu-monitor-command", domain.name,
               json.dumps({"execute": "query-block"})])  # fmt: skip
    alias = {"vda": "virtio-disk0", "sda": "scsi0-0-0-0"}[target]
    for device in json.loads(out)["return"]:
        if alias in device.get("qdev", ""):
            return str(device["inserted"]["node-name"])
    raise AssertionError(f"no node for {target}")


def rebuild(
    nbdsrv: Nbdsrv, domain: Domain, backups: dict[str, Path], since: str | None, new: str
) -> None:
    """One backup session: full (``since`` None) or incremental onto ``backups``; each
    rebuilt disk must equal what the test wrote before the point in time."""
    vm = domain.name
    args = ["--from", since] if since else []
    session = nbdsrv.cli("backup", "begin", vm, *args, "--checkpoint", new)
    expected = {t: d.sha256() for t, d in domain.disks.items()}
    domain.write("vda", 0x7E, 0, 64 * K)  # after the point in time: never read
    for target in domain.disks:
        uri = nbdsrv.uri(f"{vm}/{target}")
        if since is None:
            backups[target].write_bytes(read_all(uri))
        else:
            copy_dirty(uri, f"qemu:dirty-bitmap:{since}", backups[target])
        assert sha(backups[target].read_bytes()) == expected[target], (since, new, target)
    nbdsrv.cli("backup", "end", vm, session["id"])


def test_libvirt_snapshot_and_blockcommit_keep_the_chain(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    virsh = [require_tool("virsh"), "-c", URI]
    backups = {t: domains.dir / f"backup-{t}.raw" for t in domain.disks}
    domain.write("vda", 0x11, 0, 256 * K)
    rebuild(nbdsrv, domain, backups, None, "c0")
    domain.write("sda", 0x21, 1 * MiB, 64 * K)
    run([*virsh, "snapshot-create-as", vm, "s1", "--disk-only"])
    domain.write("vda", 0x22, 2 * MiB, 64 * K)
    rebuild(nbdsrv, domain, backups, "c0", "c1")
    for target in domain.disks:
        run([*virsh, "blockcommit", vm, target, "--active", "--pivot"], timeout=60)
    domain.write("sda", 0x31, 3 * MiB, 64 * K)
    rebuild(nbdsrv, domain, backups, "c1", "c2")
    listed = nbdsrv.cli("checkpoint", "list", vm)
    assert [(c["name"], c["valid"]) for c in listed] == [("c0", True), ("c1", True), ("c2", True)]


def test_session_survives_a_libvirtd_restart(domains: DomainFactory, nbdsrv: Nbdsrv) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    domain.write("vda", 0x11, 0, 1 * MiB)
    session = nbdsrv.cli("backup", "begin", vm)
    expected = domain.disks["vda"].sha256()
    uri = nbdsrv.uri(f"{vm}/vda")
    restart_libvirtd()
    assert sha(read_all(uri)) == expected
    # nbdsrv reconnects and still finds libvirt's job: the session ends cleanly.
    deadline = time.monotonic() + 30
    while not nbdsrv.vm(vm)["connected"]:  # type: ignore[index]
        assert time.monotonic() < deadline, nbdsrv.daemon.log()
        time.sleep(0.1)
    [listed] = nbdsrv.cli("backup", "list", vm)
    assert listed["state"] == "running"
    nbdsrv.cli("backup", "end", vm, session["id"])
    domain.wait_no_backup_job()
    created = nbdsrv.cli("checkpoint", "create", vm, "--name", "after-restart")
    assert created["name"] == "after-restart"


def test_restarted_daemon_aborts_the_job_a_killed_one_left(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    nbdsrv.cli("backup", "begin", vm, "--checkpoint", "c1")
    domain.write("vda", 0x11, 0, 64 * K)  # scratch data
    nbdsrv.kill_and_restart()
    nbdsrv.wait_vm(vm)
    domain.wait_no_backup_job()
    assert nbdsrv.cli("backup", "list", vm) == []
    for sub in ("state/libvirt", "state/scratch/libvirt"):
        path = domains.dir / sub / vm
        assert not path.exists() or not list(path.iterdir()), sub
    # The checkpoint made in the begin call is libvirt's and stays usable.
    rebuild(nbdsrv, domain, {t: domains.dir / f"b-{t}" for t in domain.disks}, None, "c2")


def test_begin_refused_while_libvirt_runs_another_backup(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    domain.begin_libvirt_backup(domains.dir / "theirs")
    try:
        # At once: libvirt itself would make a second begin wait 30 s for its job lock.
        line = nbdsrv.fails("backup", "begin", vm)
        assert "already runs a backup job" in line and "virsh domjobabort" in line
        assert nbdsrv.cli("checkpoint", "list", vm) == []
    finally:
        domain.dom.abortJob()
        domain.wait_no_backup_job()
    session = nbdsrv.cli("backup", "begin", vm)
    nbdsrv.cli("backup", "end", vm, session["id"])


def test_quiesce_without_guest_agent_fails_and_leaves_nothing(
    domains: DomainFactory, nbdsrv: Nbdsrv
) -> None:
    domain = started_vm(domains, nbdsrv)
    vm = domain.name
    line = nbdsrv.fails("backup", "begin", vm, "--quiesce", "--checkpoint", "c1")
    assert "agent" in line
    line = nbdsrv.fails("checkpoint", "create", vm, "--quiesce", "--name", "c2")
    assert "agent" in line
    assert nbdsrv.cli("checkpoint", "list", vm) == []
    assert nbdsrv.cli("backup", "list", vm) == []
    domain.wait_no_backup_job(timeout=1)
