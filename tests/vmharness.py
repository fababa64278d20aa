"""Old home of the qemu-storage-daemon harness, kept for branches written against it: new code
imports tests.harness.qsd, tests.harness.checksums and tests.harness.waiting."""

from tests.harness.checksums import sha256 as sha
from tests.harness.qsd import (
    COPY_SCRIPT,
    DISK_SIZE,
    GRANULARITY,
    ExternalQSD,
    K,
    MiB,
    attached_daemon,
    blocks,
    make_images,
    nbdsrv,
    vm,
    workdir,
)
from tests.harness.waiting import wait_for

__all__ = [
    "COPY_SCRIPT",
    "DISK_SIZE",
    "GRANULARITY",
    "ExternalQSD",
    "K",
    "MiB",
    "attached_daemon",
    "blocks",
    "make_images",
    "nbdsrv",
    "sha",
    "vm",
    "wait_for",
    "workdir",
]
