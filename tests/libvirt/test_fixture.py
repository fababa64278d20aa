"""The libvirt test fixture itself: a domain with a virtio-blk and a virtio-scsi qcow2 disk
runs under libvirtd, untainted, and writes made through the monitor reach its disks (read
back through libvirt's own pull-mode backup export)."""

from __future__ import annotations

import subprocess

from tests.harness.checksums import sha256
from tests.harness.tools import require_tool
from tests.libvirt.domains import DomainFactory, MiB


def test_domain_runs_with_both_disks_untainted(domains: DomainFactory) -> None:
    domain = domains.create()
    assert domain.is_running()
    assert sorted(domain.disks) == ["sda", "vda"]
    assert domain.tainted() == []


def test_writes_reach_the_disks(domains: DomainFactory) -> None:
    domain = domains.create()
    domain.write("vda", 0x55, 0, 64 * 1024)
    domain.write("vda", 0x56, 5 * MiB, 128 * 1024)
    domain.write("sda", 0x66, 1 * MiB, 64 * 1024)
    assert domain.tainted() == ["custom-monitor"]  # the test's monitor command, not nbdsrv's

    socket = domain.begin_libvirt_backup(domains.dir / f"{domain.name}-backup")
    try:
        for target, disk in domain.disks.items():
            data = subprocess.run(
                [require_tool("nbdcopy"), f"nbd+unix:///{target}?socket={socket}", "-"],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
            assert sha256(data) == disk.sha256(), target
    finally:
        domain.dom.abortJob()
        domain.wait_no_backup_job()
