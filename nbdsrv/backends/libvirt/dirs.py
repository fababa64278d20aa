"""Directories that QEMU, run by libvirt as its own user (``libvirt-qemu``), must reach: the
backup job's NBD socket and its scratch images live in nbdsrv's state and scratch dirs.

Each VM gets ``<dir>/libvirt/<VM>/``, owned by QEMU's user, mode 0700. The directories above
it only need to let that user through (search permission, no listing): nbdsrv grants that on
``<dir>/libvirt`` and on ``<dir>`` itself when it owns it (the default state dir is 0700), and
says clearly when a parent it does not own is in the way.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ...errors import ConfigError

log = logging.getLogger(__name__)


def vm_dir(base: str, vm: str, owner: tuple[int, int] | None) -> Path:
    """``<base>/libvirt/<vm>``, created when missing, owned by ``owner`` (QEMU's uid, gid)."""
    root = Path(base)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if owner is not None and st.st_uid == os.getuid() and not st.st_mode & stat.S_IXOTH:
        log.info("letting libvirt's QEMU search %s (chmod o+x) for its backup socket", root)
        root.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
    top = root / "libvirt"
    top.mkdir(exist_ok=True)
    # Search only: QEMU may pass through, not list.
    top.chmod(0o711)
    path = top / vm
    path.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)
        check_reachable(top, *owner)
    return path


def check_reachable(path: Path, uid: int, gid: int) -> None:
    """Raise unless ``uid``/``gid`` may search every directory from ``/`` down to ``path``."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if uid == 0 or st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise ConfigError(
                f"libvirt's QEMU (uid {uid}) cannot reach {path}: {directory} is mode "
                f"{stat.S_IMODE(st.st_mode):04o}; use a --state-dir/--scratch-dir it can "
                f"search, or `chmod o+x {directory}`"
            )


def clear(path: Path) -> None:
    """Remove the files a backup job left in a VM directory (socket, scratch images)."""
    for entry in path.iterdir():
        if entry.is_file() or entry.is_socket():
            entry.unlink(missing_ok=True)
