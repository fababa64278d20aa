"""A session's direct exports checked against its relay exports with real clients: the
same contexts (nbdinfo), the same map of every context (``nbdinfo --map``, adjacent extents
of one type joined: where a server splits its replies is its own business), the same bytes
(sha256 of what ``nbdcopy`` copies)."""

import json
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.harness.checksums import file_sha256
from tests.harness.tools import require_tool, run, run_result


def offered_contexts(uri: str) -> list[str]:
    out = run([require_tool("nbdinfo"), "--json", "--no-content", uri], timeout=60)
    return sorted(json.loads(out)["exports"][0]["contexts"])


def context_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) of ``context`` over the whole export, runs of one type joined."""
    out = run([require_tool("nbdinfo"), "--json", f"--map={context}", uri], timeout=120)
    joined: list[tuple[int, int, int]] = []
    for extent in json.loads(out):
        offset, length, kind = extent["offset"], extent["length"], extent["type"]
        if joined and joined[-1][2] == kind and joined[-1][0] + joined[-1][1] == offset:
            joined[-1] = (joined[-1][0], joined[-1][1] + length, kind)
        else:
            joined.append((offset, length, kind))
    return joined


def copy_sha(uri: str, target: Path) -> str:
    run([require_tool("nbdcopy"), uri, str(target)], timeout=300)
    digest = file_sha256(target)
    target.unlink()
    return digest


def socket_of(uri: str) -> str:
    return parse_qs(urlparse(uri).query)["socket"][0]


def assert_private_socket(uri: str) -> None:
    """The direct export's socket: the daemon's user's, nobody else may connect."""
    st = os.stat(socket_of(uri))
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)


def assert_direct_same_as_relay(
    session: dict[str, Any], workdir: Path, *, private: bool = True
) -> dict[str, str]:
    """Every disk of ``session``: direct_uri offers the relay's contexts, maps each of them
    the same, reads the same bytes. Returns disk → sha256 of its bytes."""
    digests = {}
    for disk, info in session["disks"].items():
        relay, direct = info["uri"], info["direct_uri"]
        assert direct and direct.startswith("nbd+unix:///"), info
        if private:
            assert_private_socket(direct)
        assert offered_contexts(direct) == offered_contexts(relay) == sorted(info["contexts"])
        for context in info["contexts"]:
            mapped = context_map(direct, context), context_map(relay, context)
            assert mapped[0] == mapped[1], (disk, context, *mapped)
        digest = copy_sha(relay, workdir / f"relay-{disk}.raw")
        assert copy_sha(direct, workdir / f"direct-{disk}.raw") == digest, disk
        digests[disk] = digest
    return digests


def assert_gone(uri: str) -> None:
    """Nobody serves ``uri`` any more (its export, or its whole socket, is gone)."""
    result = run_result([require_tool("nbdinfo"), "--size", uri], timeout=60)
    assert result.returncode != 0, result.stdout
