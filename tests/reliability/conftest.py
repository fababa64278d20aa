"""Fixtures: see tests/harness/qsd.py, tests/libvirt/conftest.py and tests/guest/conftest.py."""

from tests.guest.conftest import guest
from tests.harness.qsd import vm, workdir
from tests.libvirt.conftest import domains, libvirt_conn, libvirtd

__all__ = ["domains", "guest", "libvirt_conn", "libvirtd", "vm", "workdir"]
