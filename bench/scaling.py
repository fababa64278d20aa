"""How the cost grows with sessions (``bench/run.py --only session-scaling``): 1, 2, 4 and 8
backup sessions — one per VM, each VM a qcow2 full of random data on the embedded default —
read at once by one ``nbdcopy URI null:`` each, through three doors to the same points in
time:

* ``relay``: nbdsrv's ``VM/disk0`` export (``uri``), every byte through the daemon;
* ``direct``: the session's ``direct_uri``, QEMU's own export with the session's contexts;
* ``QEMU``: the upstream export nbdsrv itself reads (``nbdsrv-ID-0`` on the VM's socket), the
  reference: what QEMU serves with nobody in between.

Per row: the median time until the last nbdcopy finished, the aggregate throughput, its ratio
to QEMU's, and the CPU seconds per GiB read of the nbdsrv daemon process and of the VMs'
qemu-storage-daemons (``/proc/PID/stat`` utime + stime, before and after each timed group)
and of the nbdcopy processes (``getrusage(RUSAGE_CHILDREN)`` around the group). "CPU bound" is
the ratio to QEMU that the CPU alone allows when every core is busy with these processes:
the QEMU row's total CPU per GiB over this row's.
Doors take turns within each round (the first rotating), after one untimed warm-up each; every
export is first checked to read as the data before the writes made after the point in time.
"""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from run import GiB, log, make_random_file, stats, table
from session_read import compare, fill_and_begin, run_together, write_after
from sessions import SessionSpec, daemon, fmt_setup, qcow2

MiB = 1 << 20
COUNTS = (1, 2, 4, 8)
DOORS = ("relay", "direct", "QEMU")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes used so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)
    return total


def clients_cpu() -> float:
    """User + system CPU seconds of this process's children reaped so far (the clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the embedded VMs' qemu-storage-daemons)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(p) for p in text.split()]
    return found


def scenario_scaling(base: Path, spec: SessionSpec, rounds: int, raw: Path) -> dict[str, Any]:
    size, counts = spec.scaling_size, [c for c in COUNTS if c <= spec.scaling_vms]
    raw = raw.with_name(f"{raw.stem}-scaling-{size // MiB}M.raw")
    make_random_file(raw, size)
    vms = max(counts)
    images = {f"vm{i}": [base / f"scale-vm{i}.qcow2"] for i in range(vms)}
    for paths in images.values():
        qcow2(paths[0], size)
    with daemon(base, images, "scaling") as d:
        lives, sessions, setup = fill_and_begin(d, images, raw, size)
        sockets = {vm: d.live_socket(vm) for vm in images}
        doors = {
            "relay": [s["disks"]["disk0"]["uri"] for s in sessions.values()],
            "direct": [s["disks"]["disk0"]["direct_uri"] for s in sessions.values()],
            "QEMU": [
                f"nbd+unix:///nbdsrv-{s['id']}-0?socket={sockets[vm]}" for vm, s in sessions.items()
            ],
        }
        for live in lives.values():
            write_after(live, size)
        for uris in doors.values():  # each reads as the data before the writes
            for uri in uris:
                compare(raw, uri)
        qemus = children(d.pid)
        times: dict[int, dict[str, list[float]]] = {n: {k: [] for k in DOORS} for n in counts}
        cpu: dict[int, dict[str, dict[str, list[float]]]] = {
            n: {k: {"nbdsrv": [], "QEMU": [], "nbdcopy": []} for k in DOORS} for n in counts
        }

        def group(n: int, door: str) -> list[str]:
            return [f"nbdcopy {uri} null:" for uri in doors[door][:n]]

        for n in counts:
            for door in DOORS:  # warm-up, untimed
                run_together([c.split() for c in group(n, door)])
        for rnd in range(rounds):
            for n in counts:
                order = list(DOORS[rnd % 3 :] + DOORS[: rnd % 3])
                for door in order:
                    d.server.check_alive()
                    ours0, qemu0 = cpu_seconds([d.pid]), cpu_seconds(qemus)
                    clients0 = clients_cpu()
                    elapsed = run_together([c.split() for c in group(n, door)])
                    gib = n * size / GiB
                    times[n][door].append(elapsed)
                    cpu[n][door]["nbdsrv"].append((cpu_seconds([d.pid]) - ours0) / gib)
                    cpu[n][door]["QEMU"].append((cpu_seconds(qemus) - qemu0) / gib)
                    cpu[n][door]["nbdcopy"].append((clients_cpu() - clients0) / gib)
            log(f"scaling round {rnd + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})")
        for vm, s in sessions.items():
            d.cli("backup", "end", vm, s["id"])
    rows = []
    for n in counts:
        reference = statistics.median(times[n]["QEMU"])

        def total(door: str, n: int = n) -> float:
            return sum(statistics.median(v) for v in cpu[n][door].values())

        for door in DOORS:
            s = stats(times[n][door])
            rows.append(
                [
                    str(n),
                    door,
                    f"{s['median']:.3f}",
                    f"{s['min']:.3f}",
                    f"{s['max']:.3f}",
                    f"{n * size / GiB / s['median']:.2f}",
                    f"{reference / s['median']:.2f}",
                    f"{statistics.median(cpu[n][door]['nbdsrv']):.3f}",
                    f"{statistics.median(cpu[n][door]['QEMU']):.3f}",
                    f"{statistics.median(cpu[n][door]['nbdcopy']):.3f}",
                    f"{total('QEMU') / total(door):.2f}",
                ]
            )
    headers = [
        "sessions", "door", "median s", "min s", "max s", "aggregate GiB/s", "x QEMU",
        "nbdsrv CPU s/GiB", "QEMU CPU s/GiB", "nbdcopy CPU s/GiB", "CPU bound",
    ]  # fmt: skip
    return {
        "size": size,
        "counts": counts,
        "rounds": rounds,
        "setup": setup,
        "times": {str(n): t for n, t in times.items()},
        "cpu_per_gib": {str(n): c for n, c in cpu.items()},
        "table": table(headers, rows, left=2),
    }


def report(r: dict[str, Any]) -> list[str]:
    return [
        f"\n== session scaling: {', '.join(str(c) for c in r['counts'])} sessions read at once "
        f"(one VM each, {r['size'] / MiB:.0f} MiB of random data, one nbdcopy each), through "
        f"nbdsrv (relay), direct_uri (direct) and QEMU's export nbdsrv reads (QEMU), "
        f"{r['rounds']} round(s) interleaved (load {r['load']['before']} -> "
        f"{r['load']['after']}) ==",
        r["table"],
        f"set-up: {fmt_setup(r['setup'])}",
    ]
