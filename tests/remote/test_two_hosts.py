"""One backup server drives two hosts over --remote: the example of docs/fleet.md backs up
every VM it may see on both, full and then incremental, with libnbd; the copies are checked
against what was written on purpose. The CLI drives the same hosts with --connect."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tests.harness.tools import require_tool, run

from .fleet import FleetCerts, Host, remote_cli

ROOT = Path(__file__).parents[2]
K = 1024


def fleet_example(tmp_path: Path) -> Path:
    """The one Python example of docs/fleet.md, as a file."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "fleet.md").read_text(), re.S)
    assert len(blocks) == 1
    path = tmp_path / "fleet_backup.py"
    path.write_text(blocks[0])
    return path


def run_example(
    example: Path, certs: Path, backups: Path, hosts: tuple[Host, Host]
) -> list[dict[str, Any]]:
    """Run it as a backup server would: Debian's python3 (with python3-libnbd) and nbdsrv's
    client library from the source tree."""
    python = "/usr/bin/python3"
    require_tool(python)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = run([python, str(example), str(certs), str(backups), *(h.connect for h in hosts)],
              env=env, timeout=300)  # fmt: skip
    return [json.loads(line) for line in out.splitlines()]


def backup_of(backups: Path, host: Host, vm: str) -> bytes:
    return (backups / f"{host.ip}_{host.remote_port}" / vm / "disk0.raw").read_bytes()


def test_full_then_incremental_of_every_vm_on_two_hosts(
    hosts: tuple[Host, Host], fleet_certs: FleetCerts, tmp_path: Path
) -> None:
    host1, host2 = hosts
    example, backups = fleet_example(tmp_path), tmp_path / "backups"
    host1.write("web", 0x11, 0)
    host1.write("web", 0x12, 1024 * K)
    host1.write("secret", 0x66, 0)  # not granted to the backup server
    host2.write("mail", 0x21, 4096 * K, 128 * K)

    full = run_example(example, fleet_certs.backup, backups, hosts)
    assert sorted((r["vm"], r["mode"]) for r in full) == [("mail", "full"), ("web", "full")]
    assert backup_of(backups, host1, "web") == host1.model["web"]
    assert backup_of(backups, host2, "mail") == host2.model["mail"]
    assert not (backups / f"{host1.ip}_{host1.remote_port}" / "secret").exists()

    host1.write("web", 0x13, 0)  # overwrites data the full backup copied
    host1.write("web", 0x14, 8192 * K)
    host2.write("mail", 0x22, 64 * K)
    incremental = run_example(example, fleet_certs.backup, backups, hosts)
    copied = {r["vm"]: (r["mode"], r["bytes"]) for r in incremental}
    # Exactly the granules written since the full backup's checkpoint.
    assert copied == {"web": ("incremental", 128 * K), "mail": ("incremental", 64 * K)}
    assert backup_of(backups, host1, "web") == host1.model["web"]
    assert backup_of(backups, host2, "mail") == host2.model["mail"]

    # The same hosts through the CLI: each shows the backup server its own VMs and chain.
    for host, vm in ((host1, "web"), (host2, "mail")):
        status = remote_cli(host, fleet_certs.backup, "status")
        assert [v["name"] for v in status["vms"]] == [vm]
        chain = remote_cli(host, fleet_certs.backup, "checkpoint", "list", vm)
        assert len(chain) == 2 and chain[1]["parent"] == chain[0]["name"]
    # A local client of host1 still sees everything.
    assert {v["name"] for v in host1.daemon.status()["vms"]} == {"web", "secret"}
