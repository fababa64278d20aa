"""Session reads (``bench/run.py --only session-read``): a full read of a session disk
through nbdsrv against QEMU's own snapshot-access export of the point in time, on the
embedded default (nbdsrv's own qemu-storage-daemon, QSD, over qcow2 images).

* ``single``: one VM, a qcow2 full of random data (1 GiB), one session;
  ``nbdcopy URI null:`` (its default: multi-conn with as many connections as threads, 2 on
  2 cores), ``nbdcopy --connections=4 --threads=4`` (``--connections=4`` alone is capped at
  the thread count, so it is the default again on 2 cores) and ``qemu-img convert`` into
  ``null-co``; over unix and over TCP, servers interleaved. The connections nbdcopy really
  opened are printed (QEMU's export may not offer multi-conn).
* ``four at once``: four VMs (512 MiB of random data each), one session each, four
  ``nbdcopy`` started together against nbdsrv's four exports, then against QEMU's four
  exports, rounds interleaved; aggregate throughput (4 times the size over the time until
  the last one finished).

QEMU's export over TCP. A QEMU process runs one NBD server (a second ``--nbd-server`` or
``nbd-server-start`` fails with "NBD server already running"; ``block-export-add`` of type
nbd has no server argument), and nbdsrv reaches a session's QEMU export only over a unix
socket (``backup/sessions.py`` builds a unix ``Address``; ``--qemu-nbd`` takes a socket
path). So the QSD that nbdsrv reads cannot also serve its export on TCP, and a forwarding
proxy in front of it would measure the proxy. Over TCP the reference is a *twin*: a second
QSD the bench starts over a copy of the same data, with the node graph nbdsrv builds
(``qemu/fleece.py``: throttle → copy-before-write → qcow2, scratch qcow2,
snapshot-access, read-only NBD export) given on its command line, so its point in time is
its start; the same 64 MiB are then written through its live export, and its snapshot must
read as the data before them, like nbdsrv's. Same QEMU, same graph, same data, same
point in time in content, one process more on the machine (idle while nbdsrv is measured).
A second twin serves on a unix socket and is read alongside the real export over unix
("twin check"): how close the twin is to the export it stands in for.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from run import (
    BenchError,
    Client,
    GiB,
    Server,
    free_port,
    interleaved,
    log,
    make_random_file,
    nbd_probe,
    qemu_img_convert,
    stats,
    table,
    wait_ready,
)
from sessions import SessionSpec, daemon, fmt_setup, qcow2, run, timed

MiB = 1 << 20
CBW_TIMEOUT = 30  # as nbdsrv's qemu/fleece.py
QEMU = "QEMU"  # the reference's name in the tables: the real export on unix, a twin on tcp
TWIN = "twin"  # a twin on unix too, to check it against the real export


def read_clients(size: int) -> list[Client]:
    return [
        Client("nbdcopy", lambda uri: ["nbdcopy", uri, "null:"]),
        Client(
            "nbdcopy -C 4 -T 4",
            lambda uri: ["nbdcopy", "--connections=4", "--threads=4", uri, "null:"],
        ),
        Client("qemu-img", lambda uri: qemu_img_convert(uri, size)),
    ]


# -- content ------------------------------------------------------------------------------


def compare(raw: Path, uri: str) -> None:
    """The export reads exactly as ``raw`` (the data before the point in time)."""
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw), uri])


def write_after(live: str, size: int) -> None:
    """Writes after the point in time (64 MiB at the start of the disk, a quarter of a small
    one): they must not show through a session, and they make copy-before-write happen."""
    count = min(64 * MiB, size // 4)
    run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {count}", live])


def fill_by_qemu_nbd(raw: Path, image: Path) -> float:
    """``raw`` into the qcow2 ``image`` through qemu-nbd (QEMU's block layer, as a fill
    through the live disk); seconds taken."""
    cmd = ["nbdcopy", "--", str(raw), "[", "qemu-nbd", "-f", "qcow2", str(image), "]"]
    elapsed, _ = timed(cmd)
    return elapsed


# -- the twin: QEMU's point in time in a QSD of the bench's own ----------------------------


@dataclass
class Twin:
    server: Server
    live: str  # writable live disk (through the copy-before-write filter)
    snapshot: str  # read-only snapshot-access export: the point in time


def twin_command(image: Path, scratch: Path, nbd_server: str) -> list[str]:
    """qemu-storage-daemon with the graph of a session of nbdsrv's embedded QSD after its
    switch (qemu/storage_daemon.py + qemu/fleece.py), built at start."""
    blockdevs: list[dict[str, Any]] = [
        {"driver": "file", "filename": str(image), "node-name": "disk0-file"},
        {"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"},
        {
            "driver": "qcow2",
            "node-name": "scr0",
            "file": {"driver": "file", "filename": str(scratch)},
        },
        {
            "driver": "copy-before-write",
            "node-name": "cbw0",
            "file": "disk0",
            "target": "scr0",
            "on-cbw-error": "break-snapshot",
            "cbw-timeout": CBW_TIMEOUT,
        },
        {"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"},
        {"driver": "throttle", "throttle-group": "tg", "file": "cbw0", "node-name": "disk0-live"},
    ]
    exports = [
        {
            "type": "nbd",
            "id": "disk0",
            "node-name": "disk0-live",
            "name": "disk0",
            "writable": True,
        },
        {"type": "nbd", "id": "snap0", "node-name": "acc0", "name": "snap0", "writable": False},
    ]
    argv = ["qemu-storage-daemon", "--object", "throttle-group,id=tg"]
    for blockdev in blockdevs:
        argv += ["--blockdev", json.dumps(blockdev)]
    argv += ["--nbd-server", nbd_server]
    for export in exports:
        argv += ["--export", json.dumps(export)]
    return argv


@contextlib.contextmanager
def twin(base: Path, image: Path, size: int, transport: str = "tcp") -> Iterator[Twin]:
    """The twin QSD over ``image`` (already filled), its NBD server on 127.0.0.1 (or on a
    unix socket, to check the twin against the real export); stopped at the end."""
    scratch = base / f"{image.stem}-scratch.qcow2"
    qcow2(scratch, size)
    server = Server("QEMU twin")
    if transport == "tcp":
        port = free_port()
        address = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"

        def uri(export: str) -> str:
            return f"nbd://127.0.0.1:{port}/{export}"
    else:
        sock = base / f"{image.stem}.sock"
        server.sockets.append(sock)
        address = f"addr.type=unix,addr.path={sock}"

        def uri(export: str) -> str:
            return f"nbd+unix:///{export}?socket={sock}"

    server.spawn(twin_command(image, scratch, address), base / f"{image.stem}-qsd.log")
    try:
        wait_ready(server, nbd_probe(uri("snap0")))
        yield Twin(server, uri("disk0"), uri("snap0"))
    finally:
        server.stop()


# -- measuring ----------------------------------------------------------------------------


def nbdcopy_connections(argv: Sequence[str]) -> int:
    """The connections nbdcopy opens with these arguments: ``-v`` prints them before the
    copy starts, and the copy is stopped there."""
    proc = subprocess.Popen(
        [argv[0], "-v", *argv[1:]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            found = re.search(r"\bconnections=(\d+)", line)
            if found:
                return int(found.group(1))
    finally:
        proc.kill()
        proc.wait()
    raise BenchError(f"{' '.join(argv)} -v did not say how many connections it opened")


def run_together(cmds: Sequence[Sequence[str]]) -> float:
    """Start every command at once; seconds until the last one has finished."""
    with contextlib.ExitStack() as stack:
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in cmds]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err)
            for cmd, err in zip(cmds, errs, strict=True)
        ]  # fmt: skip
        for proc in procs:
            proc.wait()
        elapsed = time.perf_counter() - t0
        for cmd, proc, err in zip(cmds, procs, errs, strict=True):
            if proc.returncode != 0:
                err.seek(0)
                text = err.read().decode(errors="replace")[-2000:]
                raise BenchError(f"{' '.join(cmd)} failed with {proc.returncode}:\n{text}")
    return elapsed


def interleaved_groups(
    groups: Mapping[str, Sequence[str]],
    argv: Callable[[str], list[str]],
    rounds: int,
    alive: Callable[[], None],
) -> dict[str, list[float]]:
    """times[server]: each round every group of URIs read at once, servers taking turns
    (the first rotating each round), after one untimed warm-up each."""
    names = list(groups)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        run_together([argv(uri) for uri in groups[name]])
    for rnd in range(rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            alive()
            times[name].append(run_together([argv(uri) for uri in groups[name]]))
    log("  ".join(f"{name} {statistics.median(ts):.3f}s" for name, ts in times.items()))
    return times


# -- one session ----------------------------------------------------------------------------


def scenario_single(base: Path, spec: SessionSpec, rounds: int, raw: Path) -> dict[str, Any]:
    size = spec.read_size
    make_random_file(raw, size)
    image = base / "read.qcow2"
    twin_images = {t: base / f"twin-{t}.qcow2" for t in ("tcp", "unix")}
    setup: dict[str, float] = {}
    qcow2(image, size)
    qcow2(twin_images["tcp"], size)
    log(f"filling the twins' images with {size / GiB:.2f} GiB through qemu-nbd")
    setup["twin fill s"] = fill_by_qemu_nbd(raw, twin_images["tcp"])
    run(["cp", str(twin_images["tcp"]), str(twin_images["unix"])])  # the same bytes
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(daemon(base, {"vm": [image]}, "read", tcp=True))
        live = f"nbd+unix:///disk0?socket={d.live_socket('vm')}"
        log(f"filling {image.name} with {size / GiB:.2f} GiB of random data through the live disk")
        setup["fill s"], _ = timed(["nbdcopy", str(raw), live])
        t0 = time.perf_counter()
        begun = d.cli("backup", "begin", "vm", "--checkpoint", "full")
        setup["begin s"] = time.perf_counter() - t0
        sid = begun["id"]
        disk = begun["disks"]["disk0"]
        twins = {t: stack.enter_context(twin(base, p, size, t)) for t, p in twin_images.items()}
        ours = {
            "unix": disk["uri"],
            "tcp": next(u for u in disk["uris"] if u.startswith("nbd://")),
        }
        theirs = {
            "unix": f"nbd+unix:///nbdsrv-{sid}-0?socket={d.live_socket('vm')}",
            "tcp": twins["tcp"].snapshot,
        }
        for uri in (ours["unix"], theirs["unix"]):  # the random data, or nothing counts
            compare(raw, uri)
        for writer in (live, *(tw.live for tw in twins.values())):
            write_after(writer, size)
        # Every export still reads as the data before the writes: the point in time holds.
        for uri in [*ours.values(), *theirs.values(), twins["unix"].snapshot]:
            compare(raw, uri)
        # Views for interleaved(), which checks that these processes live; stopped elsewhere.
        twin_procs = [p for tw in twins.values() for p in tw.server.procs]
        twin_logs = [p for tw in twins.values() for p in tw.server.logs]
        servers = {
            "nbdsrv": Server("nbdsrv", ours, list(d.server.procs), logs=list(d.server.logs)),
            QEMU: Server(QEMU, theirs, [*d.server.procs, *twin_procs],
                         logs=[*d.server.logs, *twin_logs]),
            TWIN: Server(TWIN, {"unix": twins["unix"].snapshot}, twin_procs, logs=twin_logs),
        }  # fmt: skip
        clients = read_clients(size)
        conns = {
            c.name: {
                t: {
                    name: str(nbdcopy_connections(c.argv(s.uris[t])))
                    if c.name.startswith("nbdcopy")
                    else "1"
                    for name, s in servers.items()
                    if t in s.uris
                }
                for t in ("unix", "tcp")
            }
            for c in clients
        }
        log(f"connections opened per client, transport and server: {conns}")
        times = interleaved(servers, clients, rounds, warmup=True)
        t0 = time.perf_counter()
        d.cli("backup", "end", "vm", sid)
        setup["end s"] = time.perf_counter() - t0
    rows, ratio_rows = read_rows(times, size, QEMU, with_transport=True, conns=conns)
    headers = ["client", "transport", "server", "conns", "median s", "min s", "max s", "GiB/s"]
    text = table(headers, rows, left=3)
    ratio_headers = ["client", "transport", f"throughput nbdsrv/{QEMU}", f"time nbdsrv/{QEMU}"]
    text += "\n\n" + table(ratio_headers, ratio_rows, left=2)
    # The twin against the export nbdsrv reads, both over unix: how far the TCP reference
    # (a twin) may be from what QEMU's real export would do.
    calibration = {
        client: statistics.median(by_t["unix"][QEMU]) / statistics.median(by_t["unix"][TWIN])
        for client, by_t in times.items()
    }
    text += (
        "\n\ntwin check, unix (throughput twin/QEMU; the tcp reference is a twin): "
        + ", ".join(f"{client} {ratio:.2f}" for client, ratio in calibration.items())
    )
    return {
        "size": size,
        "rounds": rounds,
        "setup": setup,
        "connections": conns,
        "times": times,
        "ratios": {f"{r[0]}, {r[1]}": float(r[2]) for r in ratio_rows},
        "twin_check": calibration,
        "table": text,
    }


def fill_and_begin(
    d: Any, images: Mapping[str, Sequence[Path]], raw: Path, size: int
) -> tuple[dict[str, str], dict[str, Any], dict[str, float]]:
    """Fill every VM's disk with ``raw`` through its live export, then begin a full backup
    session on each: (live URIs, sessions, set-up times) by VM."""
    setup: dict[str, float] = {"fill s": 0.0}
    lives = {vm: f"nbd+unix:///disk0?socket={d.live_socket(vm)}" for vm in images}
    log(f"filling {len(images)} qcow2 images with {size / MiB:.0f} MiB each through the live disks")
    for live in lives.values():
        elapsed, _ = timed(["nbdcopy", str(raw), live])
        setup["fill s"] += elapsed
    t0 = time.perf_counter()
    sessions = {vm: d.cli("backup", "begin", vm, "--checkpoint", "full") for vm in images}
    setup["begin s"] = time.perf_counter() - t0
    return lives, sessions, setup


# -- four sessions at once ----------------------------------------------------------------


def scenario_multi(base: Path, spec: SessionSpec, rounds: int, raw: Path) -> dict[str, Any]:
    size, count = spec.multi_size, spec.multi_vms
    if size != spec.read_size:  # its own file of random data, kept in bench/work/ like raw
        raw = raw.with_name(f"{raw.stem}-{size // MiB}M.raw")
    make_random_file(raw, size)
    images = {f"vm{i}": [base / f"multi-vm{i}.qcow2"] for i in range(count)}
    for paths in images.values():
        qcow2(paths[0], size)
    with daemon(base, images, "multi") as d:
        lives, sessions, setup = fill_and_begin(d, images, raw, size)
        ours = [s["disks"]["disk0"]["uri"] for s in sessions.values()]
        theirs = [
            f"nbd+unix:///nbdsrv-{s['id']}-0?socket={d.live_socket(vm)}"
            for vm, s in sessions.items()
        ]
        for live in lives.values():
            write_after(live, size)
        for uri in ours + theirs:  # each reads as the data before the writes
            compare(raw, uri)
        log(f"{count} sessions read at once by {count} nbdcopy, servers interleaved")
        times = interleaved_groups(
            {"nbdsrv": ours, QEMU: theirs},
            lambda uri: ["nbdcopy", uri, "null:"],
            rounds,
            d.server.check_alive,
        )
        t0 = time.perf_counter()
        for vm, s in sessions.items():
            d.cli("backup", "end", vm, s["id"])
        setup["end s"] = time.perf_counter() - t0
    total = size * count
    rows = []
    for server, ts in times.items():
        s = stats(ts)
        rows.append(
            [server]
            + [f"{s[k]:.3f}" for k in ("median", "min", "max")]
            + [f"{total / GiB / s['median']:.2f}"]
        )
    ours_m, theirs_m = statistics.median(times["nbdsrv"]), statistics.median(times[QEMU])
    ratio = theirs_m / ours_m
    text = table(["server", "median s", "min s", "max s", "aggregate GiB/s"], rows, left=1)
    text += f"\n\nthroughput nbdsrv/{QEMU} {ratio:.2f}, time nbdsrv/{QEMU} {ours_m / theirs_m:.2f}"
    return {
        "size": size,
        "vms": count,
        "rounds": rounds,
        "setup": setup,
        "times": times,
        "ratio": ratio,
        "table": text,
    }


# -- reporting ----------------------------------------------------------------------------


def read_rows(
    times: dict[str, Any],
    size: int,
    reference: str,
    *,
    with_transport: bool = False,
    conns: dict[str, dict[str, dict[str, str]]] | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    """Per client (and transport) and server: median/min/max seconds and GiB/s (after the
    connections, if given); per client (and transport) the throughput ratio
    nbdsrv/``reference`` and the time ratio."""
    rows, ratio_rows = [], []
    for client, by_transport in times.items():
        for transport, by_server in by_transport.items():
            label = [client, transport] if with_transport else [client]
            for server, ts in by_server.items():
                s = stats(ts)
                used = [conns[client][transport][server]] if conns is not None else []
                rows.append(
                    [*label, server, *used]
                    + [f"{s[k]:.3f}" for k in ("median", "min", "max")]
                    + [f"{size / GiB / s['median']:.2f}"]
                )
            ours = statistics.median(by_server["nbdsrv"])
            theirs = statistics.median(by_server[reference])
            ratio_rows.append([*label, f"{theirs / ours:.2f}", f"{ours / theirs:.2f}"])
    return rows, ratio_rows


def report(results: dict[str, Any]) -> list[str]:
    out = []
    ratios: list[list[str]] = []
    if "read" in results:
        r = results["read"]
        out.append(
            f"== session read: full read of a {r['size'] / GiB:.2f} GiB qcow2 of random data "
            f"through a backup session, nbdsrv vm/disk0 vs QEMU's snapshot-access export "
            f"(unix: the export nbdsrv reads; tcp: a twin QSD, see bench/session_read.py) "
            f"(load {r['load']['before']} -> {r['load']['after']}) =="
        )
        out.append(r["table"])
        out.append(f"set-up: {fmt_setup(r['setup'])}")
        ratios += [[work, f"{v:.2f}"] for work, v in r["ratios"].items()]
    if "multi" in results:
        m = results["multi"]
        out.append(
            f"\n== session read, {m['vms']} VMs at once: {m['vms']} sessions of "
            f"{m['size'] / GiB:.2f} GiB each, {m['vms']} nbdcopy started together, unix, "
            f"nbdsrv vs QEMU's {m['vms']} exports "
            f"(load {m['load']['before']} -> {m['load']['after']}) =="
        )
        out.append(m["table"])
        out.append(f"set-up: {fmt_setup(m['setup'])}")
        ratios.append([f"{m['vms']} VMs at once, nbdcopy, unix (aggregate)", f"{m['ratio']:.2f}"])
    if ratios:
        out.append("\nsession read ratios (throughput nbdsrv/QEMU, median; goal >= 0.9):")
        out.append(table(["work", "nbdsrv/QEMU"], ratios, left=1))
    return out
