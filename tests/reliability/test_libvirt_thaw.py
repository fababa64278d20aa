"""A libvirt domain with a real Linux guest (tests/guest) whose agent libvirt drives: a daemon
SIGKILLed between `virDomainFSFreeze` and `virDomainFSThaw` of `backup begin --quiesce`
leaves the guest frozen; the restarted daemon thaws it (`virDomainFSThaw`, retried until
libvirt's agent confirms: the domain is paused at first, so the first attempts fail), clears
its marker, and `--quiesce` works again. The guest's
freeze state is read through the agent itself (`guest-fsfreeze-status`)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.build import Guest
from tests.guest.vm import BOOT_TIMEOUT, KERNEL_ARGS, make_data_disk
from tests.harness.daemon import DaemonProcess
from tests.harness.waiting import wait_for
from tests.libvirt.domains import DomainFactory
from tests.libvirt.test_libvirt_vm import Nbdsrv


def guest_domain_xml(name: str, guest: Guest, directory: Path) -> str:
    """The test guest as a libvirt domain: its kernel and initrd, an ext4 data disk (vda)
    and the guest agent's virtio-serial channel (libvirt's own socket)."""
    kernel, initrd = directory / f"{name}-vmlinuz", directory / f"{name}-initrd.gz"
    shutil.copy(guest.kernel, kernel)
    shutil.copy(guest.initrd, initrd)
    disk = directory / f"{name}-data.qcow2"
    make_data_disk(disk)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{KERNEL_ARGS}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


def agent(dom: Any, command: str) -> Any:
    """Ask the guest agent through libvirt (test only: it taints the domain)."""
    import libvirt_qemu

    answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command}), 10, 0)
    return json.loads(answer)["return"]


@pytest.fixture
def guest_domain(guest: Guest, domains: DomainFactory) -> Iterator[Any]:
    name = f"{domains.prefix}-guest"
    dom = domains.conn.createXML(guest_domain_xml(name, guest, domains.dir), 0)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            try:
                agent(dom, "guest-ping")
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"{name}: the guest agent does not answer", pytrace=False)
                time.sleep(1)
        yield dom
    finally:
        if dom.isActive():
            dom.destroy()


def test_restarted_daemon_thaws_a_guest_a_killed_one_left_frozen(
    guest_domain: Any, domains: DomainFactory
) -> None:
    vm = guest_domain.name()
    nbdsrv = Nbdsrv(domains.dir)
    nbdsrv.daemon.start(fault="quiesce:after-freeze")
    try:
        nbdsrv.wait_vm(vm)
        assert nbdsrv.daemon.cli("backup", "begin", vm, "--quiesce").returncode != 0
        nbdsrv.daemon.wait_killed()
        assert agent(guest_domain, "guest-fsfreeze-status") == "frozen"

        # Paused, libvirt refuses agent calls: the restarted daemon's first thaws fail.
        guest_domain.suspend()
        nbdsrv.daemon = DaemonProcess(nbdsrv.daemon.args, nbdsrv.control, nbdsrv.daemon.log_path)
        nbdsrv.daemon.start()
        nbdsrv.wait_vm(vm)
        assert nbdsrv.vm(vm)["guest_frozen"] is True  # type: ignore[index]
        wait_for(lambda: "thaw attempt failed" in nbdsrv.daemon.log(), "a failed thaw")
        assert nbdsrv.vm(vm)["guest_frozen"] is True  # type: ignore[index]
        guest_domain.resume()
        wait_for(lambda: agent(guest_domain, "guest-fsfreeze-status") == "thawed", "a thaw", 60)
        wait_for(lambda: (nbdsrv.vm(vm) or {}).get("guest_frozen") is False, "no marker")
        assert not (domains.dir / "state" / "vms" / vm / "frozen.json").exists()
        assert nbdsrv.cli("backup", "list", vm) == []

        session = nbdsrv.cli("backup", "begin", vm, "--quiesce", "--no-checkpoint")
        assert session["quiesced"] is True
        assert agent(guest_domain, "guest-fsfreeze-status") == "thawed"
        nbdsrv.cli("backup", "end", vm, session["id"])
        assert nbdsrv.daemon.stop() == 0
    finally:
        nbdsrv.daemon.kill()
