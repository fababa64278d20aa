"""`--metrics tcp:HOST:PORT`: Prometheus text format scraped with a real HTTP client while a
real QEMU backup session is read by nbdcopy."""

import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness.qsd import ExternalQSD, MiB, attached_daemon
from tests.harness.tools import require_tool

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})? (?P<value>[-+0-9.eE]+|\+Inf)$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus text document; fails on anything malformed."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram"), line
            typed[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no TYPE line before it"
        labels = frozenset(LABEL.findall(match["labels"] or ""))
        samples[(name, labels)] = float(match["value"])
    return samples


def scrape(port: int, path: str = "/metrics", method: str = "GET") -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def test_metrics_of_a_backup_session(vm: ExternalQSD, workdir: Path) -> None:
    port = free_port()
    daemon = attached_daemon(workdir, vm, "--metrics", f"tcp:127.0.0.1:{port}")
    daemon.start()
    try:
        daemon.json("checkpoint", "create", "vm1", "--name", "c1")
        vm.write(0, 0x11, 0, 1 * MiB)
        session = daemon.json("backup", "begin", "vm1", "--from", "c1", "--checkpoint", "c2")
        subprocess.run(
            [require_tool("nbdcopy"), daemon.uri("vm1/disk0"), str(workdir / "full.raw")],
            check=True, timeout=120,
        )  # fmt: skip
        samples = parse(scrape(port))
        # nbdcopy reads only what base:allocation reports as data: the 1 MiB written.
        size = 1 * MiB
        assert samples[("nbdsrv_sessions_active", frozenset())] == 1
        read = frozenset({("vm", "vm1"), ("disk", "disk0"), ("export", "vm1/disk0")})
        assert samples[("nbdsrv_read_bytes_total", read)] == size
        reads = frozenset({("export", "vm1/disk0"), ("command", "READ")})
        assert samples[("nbdsrv_requests_total", reads)] >= 1
        assert samples[("nbdsrv_qmp_connected", frozenset({("vm", "vm1")}))] == 1
        valid = frozenset({("vm", "vm1"), ("valid", "true")})
        assert samples[("nbdsrv_checkpoints", valid)] == 2
        assert samples[("nbdsrv_backup_begin_duration_seconds_count", frozenset())] == 1
        inf = frozenset({("le", "+Inf")})
        assert samples[("nbdsrv_backup_begin_duration_seconds_bucket", inf)] == 1
        assert ("nbdsrv_connections_active", frozenset()) in samples

        daemon.cli("backup", "end", "vm1", session["id"])
        samples = parse(scrape(port))
        assert samples[("nbdsrv_sessions_active", frozenset())] == 0
        assert samples[("nbdsrv_backup_end_duration_seconds_count", frozenset())] == 1
        # Counters do not go back when the export goes.
        assert samples[("nbdsrv_read_bytes_total", read)] == size

        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port, method="POST")
        assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET"
        with pytest.raises(urllib.error.HTTPError) as unknown:
            scrape(port, path="/other")
        assert unknown.value.code == 404
    finally:
        daemon.stop()
