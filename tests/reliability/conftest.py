"""Fixtures: see tests/vmharness.py, tests/libvirt/conftest.py and tests/guest/conftest.py."""

from tests.guest.conftest import guest
from tests.libvirt.conftest import domains, libvirt_conn, libvirtd
from tests.vmharness import vm, workdir

__all__ = ["domains", "guest", "libvirt_conn", "libvirtd", "vm", "workdir"]
