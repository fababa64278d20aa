"""SHA-256 digests as the tests compare contents: of bytes, of a file."""

import hashlib
from pathlib import Path


def sha256(data: bytes | bytearray | memoryview) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    return sha256(path.read_bytes())
