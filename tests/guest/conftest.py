"""Fixtures: the guest (built once and cached, see build.py) and a booted GuestVM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.build import Guest, GuestBuildError, build_guest
from tests.guest.vm import GuestVM
from tests.harness.dirs import short_tmp_dir
from tests.harness.tools import require_tool

# On the host: to build the guest, boot it and read its disk (nbdsh: python3-libnbd, which
# the incremental copy uses).
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "ldd", "cpio", "gzip", "qemu-system-x86_64",
         "qemu-img", "mkfs.ext4", "e2fsck", "debugfs", "nbdcopy", "nbdsh")  # fmt: skip


@pytest.fixture(scope="session")
def guest() -> Guest:
    for tool in TOOLS:
        require_tool(tool)
    try:
        return build_guest()
    except GuestBuildError as e:  # like a missing tool: no network, no apt sources, ...
        message = f"cannot build the test guest: {e}"
        if os.environ.get("NBDSRV_REQUIRE_TOOLS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def guest_workdir() -> Iterator[Path]:
    """A short directory: unix socket paths must fit in 107 bytes."""
    with short_tmp_dir("nbdsrv-g-") as path:
        yield path


@pytest.fixture
def guest_vm(guest: Guest, guest_workdir: Path) -> Iterator[GuestVM]:
    vm = GuestVM(guest_workdir, guest)
    try:
        vm.start()
        yield vm
    finally:
        vm.stop()
