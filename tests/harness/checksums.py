"""SHA-256 digests as the tests compare contents: of bytes, of a file."""

import hashlib
from pathlib import Path


def sha256(data: bytes | bytearray | memoryview) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path``, read 1 MiB at a time (images may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
