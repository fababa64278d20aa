"""Test domains under a real libvirtd: transient ``<domain type='qemu'>`` with no guest OS (it
sits in firmware) and qcow2 disks, plus a way to write to those disks as a guest would.

- :func:`system_libvirt` — the ``libvirt`` module (Debian's python3-libvirt, loaded from
  dist-packages as nbdsrv loads it), or a skip/failure when it is missing.
- :class:`Disk` / :class:`Domain` — a domain's disks, a byte model of what each holds, and
  :meth:`Domain.write` through ``virsh qemu-monitor-command … qemu-io`` (the disk's own
  BlockBackend, so a backup's copy-before-write sees the write). That monitor command taints
  the domain ("custom-monitor"): it is the test's doing, never nbdsrv's.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.harness.checksums import sha256
from tests.harness.tools import require_tool, run, run_result

URI = "qemu:///system"
MiB = 1024 * 1024
DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def system_libvirt() -> ModuleType:
    """Debian's libvirt binding (built for the same Python 3.11 ABI as the venv's)."""
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)
    try:
        import libvirt
    except ImportError:
        message = "python3-libvirt is not installed"
        if os.environ.get("NBDSRV_REQUIRE_TOOLS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    # libvirt prints every error on stderr by default; the exception carries it already.
    libvirt.registerErrorHandler(lambda *_: None, None)
    return libvirt


@dataclass
class Disk:
    """One qcow2 disk of a test domain: ``target`` is its name for libvirt and nbdsrv."""

    target: str
    bus: str  # "virtio" or "scsi"
    size: int
    image: Path
    model: bytearray = field(repr=False, default_factory=bytearray)

    def sha256(self) -> str:
        return sha256(self.model)


def disk_xml(disk: Disk) -> str:
    return (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk.image}'/><target dev='{disk.target}' bus='{disk.bus}'/></disk>"
    )


def domain_xml(name: str, disks: list[Disk]) -> str:
    """A domain with no OS and no network: firmware only, TCG (``/dev/kvm`` is unusable)."""
    scsi = any(d.bus == "scsi" for d in disks)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    {"<controller type='scsi' model='virtio-scsi'/>" if scsi else ""}
    {"".join(disk_xml(d) for d in disks)}
    <memballoon model='none'/>
  </devices>
</domain>"""


class Domain:
    """A running domain made by :class:`DomainFactory`: transient, or ``persistent`` (defined,
    so that it can be shut off and started again)."""

    def __init__(self, conn: Any, name: str, disks: list[Disk], persistent: bool = False) -> None:
        self.conn = conn
        self.name = name
        self.disks = {d.target: d for d in disks}
        self.persistent = persistent
        if persistent:
            self.dom = conn.defineXML(domain_xml(name, disks))
            self.dom.create()
        else:
            self.dom = conn.createXML(domain_xml(name, disks), 0)
        self._find_devices()

    def _find_devices(self) -> None:
        # The qemu-io device of each disk: its alias (from the live XML) or, for virtio-blk,
        # the QOM path of its backend.
        self._qemu_io_device: dict[str, str] = {}
        root = ET.fromstring(self.dom.XMLDesc(0))
        for node in root.iterfind("./devices/disk"):
            target = node.find("target")
            alias = node.find("alias")
            assert target is not None and alias is not None
            dev, bus, name_ = target.get("dev", ""), target.get("bus"), alias.get("name", "")
            self._qemu_io_device[dev] = (
                f"/machine/peripheral/{name_}/virtio-backend" if bus == "virtio" else name_
            )

    def write(self, target: str, byte: int, offset: int, length: int) -> None:
        """Write ``length`` bytes of ``byte`` at ``offset`` through the disk's device."""
        device = self._qemu_io_device[target]
        command = f'qemu-io -d {device} "write -P {byte:#x} {offset} {length}"'
        out = run([require_tool("virsh"), "-c", URI, "qemu-monitor-command", self.name,
                   "--hmp", command])  # fmt: skip
        # qemu-io reports into the domain log; the monitor answers empty unless it failed.
        if out.strip():
            pytest.fail(f"qemu-io on {self.name}/{target} failed: {out.strip()}")
        self.disks[target].model[offset : offset + length] = bytes([byte]) * length

    def qemu_ids(self) -> tuple[int, int]:
        """The uid and gid QEMU runs as (libvirt's DAC label, ``+64055:+64055``)."""
        root = ET.fromstring(self.dom.XMLDesc(0))
        for label in root.iterfind("./seclabel[@model='dac']/label"):
            uid, gid = (label.text or "").replace("+", "").split(":")
            return int(uid), int(gid)
        return os.getuid(), os.getgid()

    def begin_libvirt_backup(self, directory: Path) -> Path:
        """libvirt's own full pull-mode backup of every disk (as ``virsh backup-begin`` with
        XML would), socket and scratch files in ``directory``; its NBD socket."""
        directory.mkdir(exist_ok=True)
        os.chown(directory, *self.qemu_ids())  # QEMU's user creates the socket there
        socket = directory / "nbd.sock"
        disks = "".join(
            f"<disk name='{t}' backup='yes' type='file'>"
            f"<scratch file='{directory}/{t}.scratch'/></disk>"
            for t in self.disks
        )
        self.dom.backupBegin(
            f"<domainbackup mode='pull'><server transport='unix' socket='{socket}'/>"
            f"<disks>{disks}</disks></domainbackup>",
            None,
            0,
        )
        return socket

    def wait_no_backup_job(self, timeout: float = 30.0) -> None:
        """Wait until libvirt reports no backup job (abortJob returns before it is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            result = run_result([require_tool("virsh"), "-c", URI, "backup-dumpxml", self.name])
            if result.returncode != 0:
                assert "no domain backup job" in result.stderr, result.stderr
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: libvirt's backup job still there after {timeout:g} s")
            time.sleep(0.02)

    def log(self) -> str:
        """The domain's QEMU log (libvirt writes taint warnings there)."""
        return Path(f"/var/log/libvirt/qemu/{self.name}.log").read_text(errors="replace")

    def tainted(self) -> list[str]:
        """The taint flags libvirt logged for this domain's current run."""
        run_log = self.log().rsplit("starting up libvirt", 1)[-1]
        return re.findall(r"is tainted: (\S+)", run_log)

    def is_running(self) -> bool:
        # By name through virsh: the test's own connection may have died with a libvirtd
        # restart.
        result = run_result([require_tool("virsh"), "-c", URI, "domstate", self.name])
        return result.returncode == 0 and result.stdout.strip() == "running"

    def destroy(self) -> None:
        if self.is_running():
            run([require_tool("virsh"), "-c", URI, "destroy", self.name])

    def shut_off(self) -> None:
        """Stop a persistent domain. ``virsh destroy`` sends QEMU SIGTERM: QEMU closes its
        images cleanly (persistent bitmaps stored); this guest has no OS to shut down."""
        assert self.persistent
        self.destroy()

    def start(self) -> None:
        """Start a persistent domain that is shut off again."""
        self.dom.create()
        self._find_devices()

    def undefine(self) -> None:
        if self.persistent:
            run_result([require_tool("virsh"), "-c", URI, "undefine", self.name,
                        "--checkpoints-metadata"])  # fmt: skip


class DomainFactory:
    """Makes domains whose images live in a directory QEMU's user (libvirt-qemu) can reach."""

    def __init__(self, conn: Any, prefix: str) -> None:
        self.conn = conn
        self.prefix = prefix
        # pytest's tmp_path is under a 0700 directory that libvirt-qemu cannot traverse.
        self.dir = Path(tempfile.mkdtemp(prefix="nbdsrv-libvirt-", dir="/var/tmp"))
        self.dir.chmod(0o755)
        self.domains: list[Domain] = []

    def create(
        self, disks: tuple[tuple[str, str], ...] = (("vda", "virtio"), ("sda", "scsi")),
        size: int = 16 * MiB, persistent: bool = False,
    ) -> Domain:  # fmt: skip
        """Start a domain with qcow2 disks ``(target, bus)``, all ``size`` bytes, empty
        (``persistent``: defined, so that it can be shut off and started again)."""
        name = f"{self.prefix}-{len(self.domains)}"
        made = []
        for target, bus in disks:
            image = self.dir / f"{name}-{target}.qcow2"
            run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), str(size)])
            made.append(Disk(target, bus, size, image, bytearray(size)))
        domain = Domain(self.conn, name, made, persistent)
        self.domains.append(domain)
        return domain

    def close(self) -> None:
        for domain in self.domains:
            domain.destroy()
            domain.undefine()
        shutil.rmtree(self.dir, ignore_errors=True)
