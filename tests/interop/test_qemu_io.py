"""qemu-io reads known patterns through QEMU's NBD client (read-only)."""

import pytest

from tests.harness.images import KiB, MiB
from tests.harness.served import Served
from tests.harness.tools import require_tool, run_result

# (offset, length, byte): the runs written into the sparse image, and holes reading as 0.
PATTERNS = [
    (0, 64 * KiB, 0x11),
    (1 * MiB, 128 * KiB, 0x22),
    (4 * MiB + 64 * KiB, 64 * KiB, 0x33),
    (8 * MiB - 4 * KiB, 4 * KiB, 0x44),
    (64 * KiB, 1 * MiB - 64 * KiB, 0x00),
    (6 * MiB, 512, 0x00),
    # Across a data/hole boundary, inside one run, unaligned.
    (1 * MiB + 3, 1000, 0x22),
]


def qemu_io_read(uri: str, offset: int, length: int, byte: int) -> tuple[int, str]:
    command = f"read -P 0x{byte:02x} {offset} {length}"
    argv = [require_tool("qemu-io"), "-r", "-f", "raw", "-c", command, uri]
    result = run_result(argv)
    return result.returncode, result.stdout + result.stderr


def test_patterns_match_what_was_written(nbdsrv: Served) -> None:
    runs = {(offset, length, byte) for offset, length, byte in nbdsrv.images["sparse"].patterns}
    assert runs <= set(PATTERNS)  # the table above covers every written run


@pytest.mark.parametrize(
    ("offset", "length", "byte"), PATTERNS, ids=lambda v: f"{v:#x}" if isinstance(v, int) else v
)
def test_read_returns_the_pattern(nbdsrv: Served, offset: int, length: int, byte: int) -> None:
    rc, output = qemu_io_read(nbdsrv.tcp_uri("sparse"), offset, length, byte)
    assert rc == 0, output
    assert "Pattern verification failed" not in output


@pytest.mark.parametrize(
    ("offset", "length", "wrong"),
    [(0, 64 * KiB, 0x22), (2 * MiB, 4 * KiB, 0x11)],
    ids=["data-read-as-0x22", "hole-read-as-0x11"],
)
def test_read_with_the_wrong_pattern_fails(
    nbdsrv: Served, offset: int, length: int, wrong: int
) -> None:
    rc, output = qemu_io_read(nbdsrv.unix_uri("sparse"), offset, length, wrong)
    assert rc != 0, output
    assert f"Pattern verification failed at offset {offset}" in output
