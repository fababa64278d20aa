"""Names nbdsrv gives things inside QEMU (nodes, jobs, exports): short and well formed
whatever a disk is called.

QEMU accepts a node name of at most 31 characters, starting with a letter, then letters,
digits, ``-``, ``.`` and ``_`` ("Node name too long" otherwise). Disk ids come from users and
libvirt (``drive-virtio-disk0``, ``vdisk0``, a QOM path…), so a name never embeds one: it
carries a short hash of it instead, the same for the same disk across daemon restarts.
"""

import hashlib
import re

MAX_NODE_NAME = 31
_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def tag(text: str, length: int = 8) -> str:
    """A short, stable stand-in for ``text`` (hex digits of its SHA-256)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def qemu_name(*parts: str) -> str:
    """``parts`` joined by ``-``, checked to fit QEMU's node-name rules."""
    name = "-".join(parts)
    if len(name) > MAX_NODE_NAME or not _WELL_FORMED.fullmatch(name):
        raise ValueError(f"{name!r} is not a QEMU node name of at most {MAX_NODE_NAME} chars")
    return name


def disk_name(prefix: str, op: str, disk: str) -> str:
    """The name of what operation ``op`` (a short id) makes for ``disk``."""
    return qemu_name(prefix, op, tag(disk))
