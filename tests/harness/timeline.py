"""What a disk held at every checkpoint, and the blocks written since: proves every "since"
map exact and every point in time rebuilt, by content.

    timeline = Timeline(cli, "vm1", "disk0", workdir)
    timeline.full("c1")                 # a real full backup through NBD (sha == the model)
    write(...); timeline.wrote(offset, length, pattern)
    timeline.checkpoint("c2")           # remembers the model as the point in time c2
    timeline.verify()                   # for every checkpoint: incremental since it ==
                                        # exactly the blocks written since, and its point in
                                        # time + the incremental == the disk now (sha256)
"""

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.checksums import sha256
from tests.harness.qsd import COPY_SCRIPT, DISK_SIZE, blocks
from tests.harness.tools import require_tool

# The CLI of one daemon: (*args) → parsed --json output (a failure fails the test).
Cli = Callable[..., Any]


class Timeline:
    def __init__(
        self, cli: Cli, uri: Callable[[str], str], vm: str, disk: str, workdir: Path,
        size: int = DISK_SIZE,
    ) -> None:  # fmt: skip
        self.cli = cli
        self.uri = uri
        self.vm = vm
        self.disk = disk
        self.workdir = workdir
        self.size = size
        self.model = bytearray(size)
        # checkpoint → (the disk at its point in time, blocks written since)
        self.points: dict[str, tuple[bytes, set[int]]] = {}

    def wrote(self, offset: int, length: int, pattern: int) -> None:
        self.model[offset : offset + length] = bytes([pattern]) * length
        for _, since in self.points.values():
            since |= blocks([(offset, length)])

    def checkpoint(self, name: str) -> None:
        self.cli("checkpoint", "create", self.vm, "--name", name)
        self.points[name] = (bytes(self.model), set())

    def full(self, name: str) -> None:
        """A full backup that also creates checkpoint ``name``, checked against the model."""
        session = self.cli("backup", "begin", self.vm, "--checkpoint", name)
        target = self.workdir / f"full-{name}.raw"
        try:
            subprocess.run(
                [require_tool("nbdcopy"), self.uri(f"{self.vm}/{self.disk}"), str(target)],
                check=True, timeout=120,
            )  # fmt: skip
        finally:
            self.cli("backup", "end", self.vm, session["id"])
        assert sha256(target.read_bytes()) == sha256(self.model), f"full backup {name}"
        self.points[name] = (bytes(self.model), set())
        target.unlink()

    def incremental(self, since: str) -> tuple[set[int], bytes]:
        """(dirty blocks served as changed since ``since``, its point in time + those reads)."""
        session = self.cli("backup", "begin", self.vm, "--from", since, "--no-checkpoint")
        target = self.workdir / f"rebuilt-{since}.raw"
        target.write_bytes(self.points[since][0])
        try:
            out = subprocess.run(
                ["/usr/bin/python3", str(COPY_SCRIPT), self.uri(f"{self.vm}/{self.disk}"),
                 f"qemu:dirty-bitmap:{since}", str(target)],
                check=True, capture_output=True, text=True, timeout=120,
            ).stdout  # fmt: skip
        finally:
            self.cli("backup", "end", self.vm, session["id"])
        rebuilt = target.read_bytes()
        target.unlink()
        return blocks(json.loads(out)), rebuilt

    def verify(self, step: str = "") -> None:
        """Every checkpoint is valid, its "since" map exact, its point in time rebuilt."""
        listed = {c["name"]: c for c in self.cli("checkpoint", "list", self.vm)}
        assert set(listed) == set(self.points), step
        for name, (_, since) in self.points.items():
            assert listed[name]["valid"], f"{step}: {name}: {listed[name]['reason']}"
            dirty, rebuilt = self.incremental(name)
            assert dirty == since, f"{step}: since {name}: {sorted(dirty ^ since)} differ"
            assert sha256(rebuilt) == sha256(self.model), f"{step}: point in time {name} rebuilt"
