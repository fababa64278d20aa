"""The real Linux guest of tests/guest as a persistent libvirt domain (direct kernel boot, its
ext4 data disk as vda, libvirt's guest agent channel): backed up through nbdsrv at point A
(full, checkpoint a) and point B (incremental, checkpoint b) with different files, shut off,
point A restored in place with ``qemu-img convert -n`` through ``restore/ID``, then started:

- started paused (no guest writes yet), ``backup begin --from b``: what the restore wrote
  (``qemu-img convert -n`` writes every block) is all dirty, and point B + that incremental
  is point A by sha256;
- resumed: the guest boots from the restored disk and its files are point A's.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.build import Guest
from tests.guest.conftest import guest  # noqa: F401 - the fixture: the guest, built once
from tests.guest.vm import BOOT_TIMEOUT, KERNEL_ARGS, make_data_disk
from tests.harness.checksums import sha256 as sha
from tests.harness.tools import require_tool, run
from tests.libvirt.domains import DomainFactory, system_libvirt
from tests.libvirt.test_libvirt_vm import Nbdsrv, read_all, serving

MiB = 1024 * 1024
SIZE = 64 * MiB


class LibvirtGuest:
    """The guest under libvirt, driven through libvirt's own guest agent connection."""

    def __init__(self, conn: Any, name: str, workdir: Path, built: Guest) -> None:
        # The guest's files where QEMU's user (libvirt-qemu) can read them.
        kernel, initrd = workdir / "vmlinuz", workdir / "initrd.gz"
        shutil.copyfile(built.kernel, kernel)
        shutil.copyfile(built.initrd, initrd)
        self.disk = workdir / f"{name}-vda.qcow2"
        make_data_disk(self.disk, SIZE)
        self.name = name
        self.dom = conn.defineXML(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{KERNEL_ARGS}</cmdline></os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{self.disk}'/><target dev='vda' bus='virtio'/></disk>
    <controller type='virtio-serial'/>
    <channel type='unix'><source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='{workdir / f"{name}.console"}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>""")
        self.console = workdir / f"{name}.console"

    def agent(self, command: str, timeout: int = 30, **arguments: Any) -> Any:
        import libvirt_qemu

        text = json.dumps({"execute": command, "arguments": arguments})
        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, text, timeout, 0))["return"]

    def wait_for_agent(self) -> None:
        libvirt = system_libvirt()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    console = self.console.read_text(errors="replace")
                    pytest.fail(f"the guest agent does not answer; console:\n{console}")
                time.sleep(1)

    def shell(self, script: str, data: bytes = b"") -> str:
        """Run ``script`` in the guest (``data`` on its stdin); its stdout."""
        pid = self.agent(
            "guest-exec",
            path="/bin/sh",
            arg=["-c", script],
            **{"capture-output": True, "input-data": base64.b64encode(data).decode()},
        )["pid"]
        deadline = time.monotonic() + 60
        while True:
            status = self.agent("guest-exec-status", pid=pid)
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode()
                assert status.get("exitcode") == 0, (script, status)
                return out
            assert time.monotonic() < deadline, f"guest: {script} still running"
            time.sleep(0.05)

    def write(self, name: str, kib: int) -> None:
        """/data/``name``: ``kib`` KiB of random data made in the guest (libvirt's agent
        connection breaks on commands of a few hundred KiB)."""
        self.shell(
            f"dd if=/dev/urandom of=/data/{name}.tmp bs=1024 count={kib} 2>/dev/null && "
            f"mv /data/{name}.tmp /data/{name} && sync"
        )

    def files(self) -> dict[str, str]:
        """/data's regular files → sha256, as the guest reads them."""
        out = self.shell('for f in /data/*; do [ -f "$f" ] && sha256sum "$f"; done; true')
        return {
            path.removeprefix("/data/"): digest
            for digest, path in (line.split() for line in out.splitlines())
        }


@pytest.fixture
def nbdsrv(domains: DomainFactory) -> Iterator[Nbdsrv]:
    with serving(Nbdsrv(domains.dir)) as server:
        yield server


def test_a_restored_domain_boots_with_the_restored_files(
    domains: DomainFactory,
    nbdsrv: Nbdsrv,
    libvirt_conn: Any,
    guest: Guest,  # noqa: F811 - the imported fixture
) -> None:
    vm = f"{domains.prefix}-guest"
    machine = LibvirtGuest(libvirt_conn, vm, domains.dir, guest)
    try:
        machine.dom.create()
        machine.wait_for_agent()
        nbdsrv.wait_vm(vm)
        machine.write("one", 300)
        machine.write("two", 70)
        point_a = machine.files()
        assert sorted(point_a) == ["one", "two"]
        full = nbdsrv.cli("backup", "begin", vm, "--checkpoint", "a")
        a = domains.dir / "a.raw"
        a.write_bytes(read_all(nbdsrv.uri(f"{vm}/vda")))
        nbdsrv.cli("backup", "end", vm, full["id"])

        machine.write("one", 300)
        machine.write("three", 1024)
        machine.shell("rm /data/two && sync")
        incremental = nbdsrv.cli("backup", "begin", vm, "--from", "a", "--checkpoint", "b")
        b = read_all(nbdsrv.uri(f"{vm}/vda"))
        nbdsrv.cli("backup", "end", vm, incremental["id"])
        assert sorted(machine.files()) == ["one", "three"]

        machine.dom.destroy()  # SIGTERM: QEMU stores the bitmaps as it closes the image
        nbdsrv.wait_vm(vm, present=False)
        restore = nbdsrv.cli("restore", "begin", vm, "--disk", "vda")
        run([require_tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(a),
             nbdsrv.uri(restore["export"])], timeout=120)  # fmt: skip
        nbdsrv.cli("restore", "end", restore["id"])

        libvirt = system_libvirt()
        machine.dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        nbdsrv.wait_vm(vm)
        session = nbdsrv.cli("backup", "begin", vm, "--from", "b", "--no-checkpoint")
        uri = nbdsrv.uri(f"{vm}/vda")
        dirty = run([require_tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:b", uri])
        ranges = [(e["offset"], e["length"]) for e in json.loads(dirty) if e["type"] & 1]
        assert ranges == [(0, SIZE)]  # qemu-img convert -n wrote (or zeroed) every block
        now = read_all(uri)
        nbdsrv.cli("backup", "end", vm, session["id"])
        rebuilt = bytearray(b)
        for offset, length in ranges:
            rebuilt[offset : offset + length] = now[offset : offset + length]
        assert sha(bytes(rebuilt)) == sha(a.read_bytes())

        machine.dom.resume()
        machine.wait_for_agent()
        assert machine.files() == point_a
    finally:
        libvirt = system_libvirt()
        if machine.dom.isActive():
            machine.dom.destroy()
        machine.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
