"""qemu-img (QEMU's NBD client) against a real nbdsrv daemon."""

import json
from pathlib import Path

import pytest

from tests.harness.checksums import file_sha256
from tests.harness.served import Served
from tests.harness.tools import require_tool, run, run_fails


def qemu_img(*args: str) -> str:
    return run([require_tool("qemu-img"), *args])


def test_info_shows_the_export_size(nbdsrv: Served) -> None:
    info = json.loads(qemu_img("info", "--output=json", "-f", "raw", nbdsrv.tcp_uri("sparse")))
    assert info["virtual-size"] == nbdsrv.images["sparse"].size


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_compare_with_the_file_finds_them_identical(nbdsrv: Served, transport: str) -> None:
    uri = nbdsrv.tcp_uri("sparse") if transport == "tcp" else nbdsrv.unix_uri("sparse")
    path = str(nbdsrv.images["sparse"].path)
    # -s (strict): allocation must agree too, not only the bytes.
    out = qemu_img("compare", "-s", "-f", "raw", "-F", "raw", path, uri)
    assert "Images are identical" in out


def test_compare_with_a_different_file_finds_a_mismatch(nbdsrv: Served, tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    content = bytearray(nbdsrv.images["sparse"].content())
    content[1024 * 1024 + 7] ^= 0xFF
    other.write_bytes(content)
    argv = [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw"]
    result = run_fails([*argv, str(other), nbdsrv.tcp_uri("sparse")])
    assert result.returncode == 1, result.stderr  # 1: images differ (2: error)
    assert "Content mismatch at offset 1048576" in result.stdout


def test_convert_to_raw_matches_the_file(nbdsrv: Served, tmp_path: Path) -> None:
    target = tmp_path / "converted.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", nbdsrv.unix_uri("sparse"), str(target))
    assert file_sha256(target) == nbdsrv.images["sparse"].sha256()


def test_map_matches_the_data_and_hole_layout(nbdsrv: Served) -> None:
    entries = json.loads(qemu_img("map", "--output=json", "-f", "raw", nbdsrv.tcp_uri("sparse")))
    seen = [(e["start"], e["length"], e["data"], e["zero"]) for e in entries]
    expected = [
        (offset, length, is_data, not is_data)
        for offset, length, is_data in nbdsrv.images["sparse"].layout
    ]
    assert seen == expected


def test_unknown_export_is_reported_as_not_present(nbdsrv: Served) -> None:
    result = run_fails([require_tool("qemu-img"), "info", "-f", "raw", nbdsrv.tcp_uri("nope")])
    # QEMU shows the server's own message after "server reported:".
    assert "Requested export not available" in result.stderr
    assert "server reported: export 'nope' not present" in result.stderr
