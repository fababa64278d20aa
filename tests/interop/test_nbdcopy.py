"""nbdcopy (libnbd) copies every export exactly, over TCP and unix sockets."""

import subprocess
from pathlib import Path

import pytest

from tests.harness.checksums import file_sha256 as sha256
from tests.harness.served import Served
from tests.harness.tools import require_tool, run


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("export", ["sparse", "odd"])
def test_copy_to_file_is_identical(
    nbdsrv: Served, tmp_path: Path, transport: str, export: str
) -> None:
    uri = nbdsrv.tcp_uri(export) if transport == "tcp" else nbdsrv.unix_uri(export)
    target = tmp_path / "copy.raw"
    run([require_tool("nbdcopy"), uri, str(target)])
    assert target.stat().st_size == nbdsrv.images[export].size
    assert sha256(target) == nbdsrv.images[export].sha256()


def test_copy_with_four_connections_is_identical(nbdsrv: Served, tmp_path: Path) -> None:
    # Four connections (the server advertises multi-conn), several requests in flight each,
    # and small requests so that each connection serves many of them.
    target = tmp_path / "copy.raw"
    argv = [require_tool("nbdcopy"), "--connections=4", "--requests=8", "--request-size=65536"]
    run([*argv, nbdsrv.tcp_uri("sparse"), str(target)])
    assert sha256(target) == nbdsrv.images["sparse"].sha256()


def test_copy_to_stdout_is_identical(nbdsrv: Served, tmp_path: Path) -> None:
    target = tmp_path / "copy.raw"
    with open(target, "wb") as out:
        # The bytes go straight to the file, not through run()'s text capture.
        proc = subprocess.run(
            [require_tool("nbdcopy"), nbdsrv.unix_uri("sparse"), "-"],
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    assert sha256(target) == nbdsrv.images["sparse"].sha256()


@pytest.mark.parametrize("export", ["sparse", "odd"])
def test_copy_to_null_reads_the_whole_export(nbdsrv: Served, export: str) -> None:
    # Every read must succeed: nbdcopy exits non-zero on the first failed request.
    run([require_tool("nbdcopy"), "--connections=2", nbdsrv.tcp_uri(export), "null:"])
