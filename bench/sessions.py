"""Backup-session benchmarks (``bench/run.py --only session``), on the embedded default:
nbdsrv runs its own qemu-storage-daemon (QSD) over qcow2 images and exports a session's
point in time as ``VM/DISK``, reading through QEMU's fleecing export.

* ``session read`` (``bench/session_read.py``, ``--only session-read``): a full read of a
  1 GiB qcow2 full of random data through a session against QEMU's own snapshot-access
  export, with nbdcopy (default, 4 connections) and qemu-img convert, over unix and TCP;
  and four sessions of four VMs read at once against QEMU's four exports.
* ``session begin/end``: how long ``backup begin`` and ``backup end`` take, for a VM with one
  and with two disks, full and ``--from`` a checkpoint with dirty data, with a new checkpoint
  (the default) and with ``--no-checkpoint``; through the CLI and through the control socket.
* ``session map``: a whole-disk dirty map of a 1 TiB qcow2 with 100,000 dirty blocks since
  c1, written a tenth after each of checkpoints c1 … c10: ``nbdinfo --map`` and ``qemu-img
  map`` (one extent per request) against nbdsrv and against ``qemu-nbd -B c1`` serving a copy
  of the same image with c2 … c10 merged into c1, interleaved; the extent lists must agree.
  Then begin with all 10 contexts (timed) and the memory of its bitmaps.

* ``session scaling`` (``bench/scaling.py``, ``--only session-scaling``): 1, 2, 4 and 8
  sessions read at once through nbdsrv, through ``direct_uri`` and through QEMU's export
  read directly, with the CPU each side spends per GiB.

Parts (``--only session`` runs them all): ``read`` and ``multi`` (``--only session-read``),
``begin`` (``--only session-begin``), ``map`` (``--only session-map``), ``scaling``
(``--only session-scaling``).

Everything lives in ``bench/work/session/``, removed at the end (logs kept on failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from run import (
    WORK,
    BenchError,
    Client,
    GiB,
    Server,
    free_port,
    interleaved,
    log,
    nbd_probe,
    nbdsrv_bin,
    parse_map,
    run_client,
    stats,
    table,
    wait_ready,
)

SESSION_WORK = WORK / "session"
SYSTEM_PYTHON = "/usr/bin/python3"  # has libnbd's bindings (python3-libnbd); the venv has not
WRITER = Path(__file__).resolve().with_name("dirty_writer.py")
TiB = 1 << 40
MiB = 1 << 20
KiB = 1 << 10
MAP_CHECKPOINTS = 10  # dirty map: checkpoints c1..c10, a tenth of the writes after each
PARTS = ("read", "multi", "begin", "map", "scaling")


@dataclass(frozen=True)
class SessionSpec:
    read_size: int  # session read: virtual size of the qcow2 full of random data
    multi_vms: int  # session read at once: VMs, one session each
    multi_size: int  # session read at once: virtual size of each VM's qcow2 (random data)
    begin_disk_size: int  # begin/end: virtual size of each disk
    begin_writes: int  # begin/end: dirty 4 KiB writes per disk since c1
    cycles: int  # begin/end: timed cycles per configuration
    map_size: int  # map: virtual size of the sparse qcow2
    map_writes: int  # map: dirty 4 KiB writes since the checkpoint
    qemu_img_map_rounds: int  # map: qemu-img map is slow (one extent a request)
    scaling_vms: int = 8  # scaling: the most sessions read at once (1, 2, 4, 8 up to it)
    scaling_size: int = 256 * MiB  # scaling: virtual size of each VM's qcow2 (random data)


def spec_for(quick: bool, rounds: int, read_size: int) -> SessionSpec:
    if quick:
        return SessionSpec(
            read_size, 4, read_size, 1 * GiB, 100, max(rounds, 2), 16 * GiB, 2_000, rounds,
            8, 64 * MiB,
        )  # fmt: skip
    return SessionSpec(
        read_size,
        4,
        min(read_size, 512 * MiB),  # 4 x 512 MiB: session-read stays within minutes under load
        10 * GiB,
        1_000,
        max(rounds, 7),
        1 * TiB,
        100_000,
        min(rounds, 3),
    )


# -- tools ----------------------------------------------------------------------------------


def run(cmd: Sequence[str], timeout: float = 600) -> str:
    """Run a command; its stdout, or BenchError with its stderr."""
    try:
        r = subprocess.run(
            list(cmd), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(cmd)} took more than {timeout:.0f} s") from e
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace")[-2000:]
        raise BenchError(f"{' '.join(cmd)} failed with {r.returncode}:\n{err}")
    return r.stdout.decode()


def timed(cmd: Sequence[str], timeout: float = 600) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = run(cmd, timeout)
    return time.perf_counter() - t0, out


def qcow2(path: Path, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])


def write_dirty(uri: str, count: int, size: int, part: str = "0/1") -> float:
    """``count`` 4 KiB writes at spread 64 KiB-aligned offsets (only part K of N of them);
    seconds taken."""
    cmd = [SYSTEM_PYTHON, str(WRITER), uri, str(count), str(size), "--part", part]
    out = run(cmd, timeout=1200)
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def control_call(path: Path, op: str, args: dict[str, Any], timeout: float = 600) -> Any:
    """One request on nbdsrv's control socket (JSON lines), without the CLI's start-up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise BenchError(f"control {op}: the daemon closed the connection")
    response = json.loads(line)
    if not response.get("ok"):
        raise BenchError(f"control {op}: {response.get('error')}")
    return response["result"]


# -- the daemon -----------------------------------------------------------------------------


class Daemon:
    """``nbdsrv daemon --image VM=…`` (the embedded default) on a unix socket, and with
    ``tcp`` on a free port of 127.0.0.1 too (``tcp_port``)."""

    def __init__(
        self, base: Path, images: Mapping[str, Sequence[Path]], tag: str, tcp: bool = False
    ) -> None:
        self.state = base / f"{tag}-state"
        self.state.mkdir(exist_ok=True)
        self.control = self.state / "control.sock"
        self.sock = base / f"{tag}.sock"
        self.server = Server(f"nbdsrv ({tag})")
        self.server.sockets += [self.sock, self.control]
        cmd = [str(nbdsrv_bin()), "daemon", "--state-dir", str(self.state)]
        cmd += ["--control", str(self.control), "--listen", f"unix:{self.sock}"]
        self.tcp_port = free_port() if tcp else None
        if self.tcp_port is not None:
            cmd += ["--listen", f"tcp:127.0.0.1:{self.tcp_port}"]
        for vm, paths in images.items():
            cmd += ["--image", f"{vm}=" + ",".join(str(p) for p in paths)]
        self.server.spawn(cmd, base / f"{tag}.log")
        status = [str(nbdsrv_bin()), "status", "--control", str(self.control)]

        def ready() -> bool:
            return subprocess.run(status, capture_output=True, check=False).returncode == 0

        try:
            wait_ready(self.server, ready, timeout=60)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.server.procs[0].pid

    def cli(self, *args: str) -> Any:
        """``nbdsrv ARGS --control … --json``: the parsed JSON."""
        self.server.check_alive()
        out = run([str(nbdsrv_bin()), *args, "--control", str(self.control), "--json"])
        return json.loads(out) if out.strip() else None

    def call(self, op: str, args: dict[str, Any]) -> Any:
        self.server.check_alive()
        return control_call(self.control, op, args)

    def live_socket(self, vm: str) -> str:
        for info in self.cli("status")["vms"]:
            if info["name"] == vm:
                return str(info["live_socket"])
        raise BenchError(f"nbdsrv has no VM {vm}")

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def daemon(
    base: Path, images: Mapping[str, Sequence[Path]], tag: str, tcp: bool = False
) -> Iterator[Daemon]:
    d = Daemon(base, images, tag, tcp)  # stops what it started if it fails
    try:
        yield d
    finally:
        d.stop()


def view(name: str, uri: str, d: Daemon) -> Server:
    """A Server wrapper for one URI served by (or through) ``d``: interleaved() checks that
    the daemon is alive; never stopped through this wrapper."""
    return Server(name, uris={"unix": uri}, procs=list(d.server.procs), logs=list(d.server.logs))


def reap_strays(base: Path) -> None:
    """Any process still running with our work directory in its command line (a QSD left
    over if nbdsrv had to be killed) gets SIGTERM, by pid."""
    me = os.getpid()
    needle = str(base).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                log(f"stopping stray process {entry.name}")
                os.kill(int(entry.name), signal.SIGTERM)


# -- begin / end ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BeginConfig:
    vm: str
    disks: int
    since: bool  # --from c1
    new_checkpoint: bool  # default (a new checkpoint, deleted again untimed) or --no-checkpoint

    @property
    def label(self) -> tuple[str, str, str]:
        return (
            str(self.disks),
            "c1" if self.since else "-",
            "new" if self.new_checkpoint else "--no-checkpoint",
        )


def scenario_begin(base: Path, spec: SessionSpec) -> dict[str, Any]:
    images = {
        "vm1": [base / "begin-vm1-disk0.qcow2"],
        "vm2": [base / "begin-vm2-disk0.qcow2", base / "begin-vm2-disk1.qcow2"],
    }
    for paths in images.values():
        for p in paths:
            qcow2(p, spec.begin_disk_size)
    configs = [
        BeginConfig(vm, len(images[vm]), since, new)
        for vm in images
        for since in (False, True)
        for new in (True, False)
    ]
    samples: dict[tuple[BeginConfig, str], dict[str, list[float]]] = {
        (c, via): {"begin": [], "end": []} for c in configs for via in ("cli", "socket")
    }
    setup: dict[str, float] = {}
    counter = iter(range(1 << 30))
    with daemon(base, images, "begin") as d:
        for vm, paths in images.items():
            d.cli("checkpoint", "create", vm, "--name", "c1")
            live = d.live_socket(vm)
            for i in range(len(paths)):
                uri = f"nbd+unix:///disk{i}?socket={live}"
                setup[f"{vm} disk{i} writes s"] = write_dirty(
                    uri, spec.begin_writes, spec.begin_disk_size
                )

        def cycle(c: BeginConfig, via: str, record: bool) -> None:
            name = f"b{next(counter)}"
            args: dict[str, Any] = {"vm": c.vm}
            cli = ["backup", "begin", c.vm]
            if c.since:
                args["from"] = "c1"
                cli += ["--from", "c1"]
            if c.new_checkpoint:
                args["checkpoint"] = name
                cli += ["--checkpoint", name]
            else:
                args["no_checkpoint"] = True
                cli += ["--no-checkpoint"]
            t0 = time.perf_counter()
            begun = d.cli(*cli) if via == "cli" else d.call("backup-begin", args)
            t1 = time.perf_counter()
            if len(begun["disks"]) != c.disks:
                raise BenchError(f"session of {c.vm} has {len(begun['disks'])} disks")
            want = ["qemu:dirty-bitmap:c1"] if c.since else []
            for disk in begun["disks"].values():
                if [x for x in disk["contexts"] if x.startswith("qemu:dirty-bitmap:")] != want:
                    raise BenchError(f"unexpected contexts {disk['contexts']}")
            t2 = time.perf_counter()
            if via == "cli":
                d.cli("backup", "end", c.vm, begun["id"])
            else:
                d.call("backup-end", {"vm": c.vm, "id": begun["id"]})
            t3 = time.perf_counter()
            if c.new_checkpoint:  # untimed: keep the chain as it was (c1, recording)
                d.cli("checkpoint", "delete", c.vm, name)
            if record:
                samples[(c, via)]["begin"].append(t1 - t0)
                samples[(c, via)]["end"].append(t3 - t2)

        log("begin/end: one untimed cycle per configuration")
        for c in configs:
            cycle(c, "socket", record=False)
        order = [(c, via) for c in configs for via in ("cli", "socket")]
        for rnd in range(spec.cycles):
            k = rnd % len(order)
            for c, via in order[k:] + order[:k]:
                cycle(c, via, record=True)
        status = [str(nbdsrv_bin()), "status", "--control", str(d.control)]
        cli_start = []
        for _ in range(spec.cycles):
            t0 = time.perf_counter()
            run(status)
            cli_start.append(time.perf_counter() - t0)
        for vm in images:
            listed = d.cli("checkpoint", "list", vm)
            if [(x["name"], x["valid"]) for x in listed] != [("c1", True)]:
                raise BenchError(f"{vm}: checkpoints after the cycles: {listed}")
    rows = []
    for (c, via), s in samples.items():
        b, e = stats(s["begin"]), stats(s["end"])
        rows.append(
            [*c.label, via]
            + [f"{b[k] * 1000:.0f}" for k in ("median", "min", "max")]
            + [f"{e[k] * 1000:.0f}" for k in ("median", "min", "max")]
        )
    headers = ["disks", "--from", "checkpoint", "via", "begin ms", "min", "max"]
    headers += ["end ms", "min", "max"]
    text = table(headers, rows, left=4)
    text += (
        f"\n\n`nbdsrv status` through the CLI (start-up of the Python CLI, for scale): "
        f"median {statistics.median(cli_start) * 1000:.0f} ms"
    )
    return {
        "disk_size": spec.begin_disk_size,
        "writes": spec.begin_writes,
        "cycles": spec.cycles,
        "setup": setup,
        "samples": {"/".join([*c.label, via]): s for (c, via), s in samples.items()},
        "status_cli": cli_start,
        "table": text,
    }


# -- dirty map ------------------------------------------------------------------------------


def parse_qemu_map(text: str) -> tuple[int, tuple[tuple[int, int, bool, bool], ...]]:
    """``qemu-img map --output=json`` -> (entries, runs with adjacent equal flags merged)."""
    merged: list[list[Any]] = []
    entries = json.loads(text)
    for e in entries:
        key = (bool(e["data"]), bool(e["zero"]))
        if merged and merged[-1][2:] == list(key) and merged[-1][0] + merged[-1][1] == e["start"]:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["start"], e["length"], *key])
    return len(entries), tuple((o, n, d, z) for o, n, d, z in merged)


def image_bitmaps(path: Path) -> list[dict[str, Any]]:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]))
    data = info.get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


def scenario_map(base: Path, spec: SessionSpec, rounds: int) -> dict[str, Any]:
    image, copy = base / "map.qcow2", base / "map-copy.qcow2"
    qcow2(image, spec.map_size)
    setup: dict[str, float] = {}
    t_setup = time.perf_counter()
    with daemon(base, {"vm": [image]}, "map") as d:
        live = d.live_socket("vm")
        log(
            f"map: {spec.map_writes:,} writes of 4 KiB at spread offsets into a "
            f"{spec.map_size / GiB:,.0f} GiB qcow2 through the live disk, a tenth after each "
            f"of {MAP_CHECKPOINTS} checkpoints"
        )
        setup["writes s"] = 0.0
        for k in range(MAP_CHECKPOINTS):
            d.cli("checkpoint", "create", "vm", "--name", f"c{k + 1}")
            setup["writes s"] += write_dirty(
                f"nbd+unix:///disk0?socket={live}",
                spec.map_writes,
                spec.map_size,
                part=f"{k}/{MAP_CHECKPOINTS}",
            )
    # nbdsrv stopped (SIGTERM): the QSD closed the image, the bitmap is on disk.
    bitmaps = {b["name"]: b for b in image_bitmaps(image)}
    for k in range(1, MAP_CHECKPOINTS + 1):
        if f"c{k}" not in bitmaps or "in-use" in bitmaps[f"c{k}"].get("flags", []):
            raise BenchError(f"{image.name}: no clean persistent bitmap c{k}: {bitmaps}")
    log(f"map: copying {image.name} ({image.stat().st_blocks * 512 / GiB:.1f} GiB allocated)")
    t0 = time.perf_counter()
    run(["cp", "--sparse=always", "--reflink=auto", str(image), str(copy)])
    # qemu-nbd serves one bitmap: merge c2..c10 into c1 of the copy, = nbdsrv's "since c1".
    for k in range(2, MAP_CHECKPOINTS + 1):
        run(["qemu-img", "bitmap", "--merge", f"c{k}", "-f", "qcow2", str(copy), "c1"])
    setup["copy s"] = time.perf_counter() - t0
    setup["total s"] = time.perf_counter() - t_setup
    log(f"map: set up in {setup['total s']:.1f} s ({setup})")

    context = "qemu:dirty-bitmap:c1"
    qsock = base / "map-qemu-nbd.sock"
    qemu_nbd = Server("qemu-nbd")
    qemu_nbd.sockets.append(qsock)
    begins: list[float] = []
    counts: dict[str, set[int]] = {}
    try:
        cmd = ["qemu-nbd", "-r", "-f", "qcow2", "-B", "c1", "-t", "-e", "8", "-x", "disk"]
        qemu_nbd.spawn([*cmd, "-k", str(qsock), str(copy)], base / "map-qemu-nbd.log")
        qemu_nbd.uris = {"unix": f"nbd+unix:///disk?socket={qsock}"}
        wait_ready(qemu_nbd, nbd_probe(qemu_nbd.uris["unix"]))
        with daemon(base, {"vm": [image]}, "map") as d:
            # Time begin --from c1 of the big bitmap (QEMU → nbdsrv over NBD, into memory).
            for _ in range(max(2, min(rounds, 5))):
                t0 = time.perf_counter()
                begun = d.call("backup-begin", {"vm": "vm", "from": "c1", "no_checkpoint": True})
                begins.append(time.perf_counter() - t0)
                d.call("backup-end", {"vm": "vm", "id": begun["id"]})
            begun = d.cli("backup", "begin", "vm", "--from", "c1", "--no-checkpoint")
            ours = begun["disks"]["disk0"]["uri"]
            if context not in begun["disks"]["disk0"]["contexts"]:
                raise BenchError(f"session offers {begun['disks']['disk0']['contexts']}")
            servers = {"nbdsrv": view("nbdsrv", ours, d), "qemu-nbd": qemu_nbd}
            sockets = {"nbdsrv": str(d.sock), "qemu-nbd": str(qsock)}
            exports = {"nbdsrv": "vm/disk0", "qemu-nbd": "disk"}

            def qemu_img_map(uri: str) -> list[str]:
                name = next(n for n, s in servers.items() if s.uris["unix"] == uri)
                opts = f"driver=nbd,server.type=unix,server.path={sockets[name]}"
                opts += f",export={exports[name]},x-dirty-bitmap={context}"
                return ["qemu-img", "map", "--output=json", "--image-opts", opts]

            def counting(client: str, parse: Any) -> Any:
                def check(out: str) -> Any:
                    value = parse(out)
                    counts.setdefault(client, set()).add(value[0])
                    return value

                return check

            nbdinfo = Client(
                "nbdinfo --map",
                lambda uri: ["nbdinfo", f"--map={context}", uri],
                counting("nbdinfo --map", parse_map),
            )
            qmap = Client("qemu-img map", qemu_img_map, counting("qemu-img map", parse_qemu_map))
            expected = 2 * spec.map_writes + 1
            _, (count, _) = run_client(nbdinfo, ours)
            if count != expected:
                raise BenchError(f"nbdsrv reports {count} extents, expected {expected}")
            log(f"map: nbdsrv reports {count:,} extents; nbdinfo --map, interleaved")
            times = interleaved(servers, [nbdinfo], rounds, warmup=True, transports=("unix",))
            log(
                f"map: qemu-img map, {spec.qemu_img_map_rounds} round(s) interleaved, "
                "no warm-up (one request per extent: slow)"
            )
            times |= interleaved(
                servers, [qmap], spec.qemu_img_map_rounds, warmup=False, transports=("unix",)
            )
            d.call("backup-end", {"vm": "vm", "id": begun["id"]})
            all_begins, memory = begin_all_checkpoints(d, rounds, spec.map_size)
    finally:
        qemu_nbd.stop()
    rows = []
    for client, by_transport in times.items():
        by_server = by_transport["unix"]
        ours_m = statistics.median(by_server["nbdsrv"])
        for server, ts in by_server.items():
            s = stats(ts)
            ratio = "" if server == "nbdsrv" else f"{ours_m / s['median']:.2f}"
            rows.append(
                [client, server, str(len(ts))]
                + [f"{s[k]:.3f}" for k in ("median", "min", "max")]
                + [f"{expected / s['median']:,.0f}", ratio]
            )
    headers = ["client", "server", "runs", "median s", "min s", "max s", "extents/s"]
    headers.append("time nbdsrv/this")
    text = table(headers, rows, left=2)
    b = stats(begins)
    text += (
        f"\n\nbackup begin --from c1 --no-checkpoint (control socket), {len(begins)} cycles: "
        f"median {b['median']:.3f} s, min {b['min']:.3f} s, max {b['max']:.3f} s"
    )
    a = stats(all_begins)
    text += (
        f"\nbackup begin --from c1 --all-checkpoints --no-checkpoint ({MAP_CHECKPOINTS} "
        f"contexts), {len(all_begins)} cycles: median {a['median']:.3f} s, "
        f"min {a['min']:.3f} s, max {a['max']:.3f} s"
    )
    text += "\nbitmap memory of that session: " + ", ".join(
        f"{k} {v / MiB:.2f} MiB ({v / MiB / (spec.map_size / TiB) / MAP_CHECKPOINTS:.2f} "
        "MiB per TiB per checkpoint)"
        for k, v in memory.items()
    )
    text += "\nentries per map (merged runs; all runs of both servers agreed): " + ", ".join(
        f"{client} {sorted(n)}" for client, n in counts.items()
    )
    return {
        "size": spec.map_size,
        "writes": spec.map_writes,
        "extents": expected,
        "entries": {client: sorted(n) for client, n in counts.items()},
        "rounds": rounds,
        "setup": setup,
        "begin": begins,
        "begin_all": all_begins,
        "memory": memory,
        "times": times,
        "table": text,
    }


def begin_all_checkpoints(d: Daemon, rounds: int, size: int) -> tuple[list[float], dict[str, int]]:
    """Begin/end ``--all-checkpoints`` cycles (control socket), then one more session whose
    dirty-map memory is read from ``status`` right after begin and after a whole-disk
    ``nbdinfo --map`` of every context."""
    times = []
    args = {"vm": "vm", "from": "c1", "all_checkpoints": True, "no_checkpoint": True}
    for _ in range(max(2, min(rounds, 5))):
        t0 = time.perf_counter()
        begun = d.call("backup-begin", args)
        times.append(time.perf_counter() - t0)
        d.call("backup-end", {"vm": "vm", "id": begun["id"]})
    begun = d.call("backup-begin", args)

    def map_bytes() -> int:
        exports = d.call("status", {})["exports"]
        return sum(int(e.get("dirty_map_bytes", 0)) for e in exports)

    memory = {"after begin": map_bytes()}
    disk = begun["disks"]["disk0"]
    if len([c for c in disk["contexts"] if c.startswith("qemu:dirty-bitmap:")]) != MAP_CHECKPOINTS:
        raise BenchError(f"--all-checkpoints offers {disk['contexts']}")
    for context in disk["contexts"]:
        if context.startswith("qemu:dirty-bitmap:"):
            run(["nbdinfo", f"--map={context}", disk["uri"]])
    memory["after a map of each"] = map_bytes()
    d.call("backup-end", {"vm": "vm", "id": begun["id"]})
    return times, memory


# -- entry ----------------------------------------------------------------------------------


def scenario_session(
    quick: bool, rounds: int, read_size: int, raw: Path, parts: Sequence[str] = PARTS
) -> dict[str, Any]:
    import scaling  # these import this module
    import session_read

    spec = spec_for(quick, rounds, read_size)
    for tool in ("qemu-storage-daemon", "qemu-io", SYSTEM_PYTHON):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (run `make deps`)")
    base = SESSION_WORK
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    results: dict[str, Any] = {"spec": spec.__dict__}
    ok = False
    try:
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "read": lambda: session_read.scenario_single(base, spec, rounds, raw),
            "multi": lambda: session_read.scenario_multi(base, spec, rounds, raw),
            "begin": lambda: scenario_begin(base, spec),
            "map": lambda: scenario_map(base, spec, rounds),
            "scaling": lambda: scaling.scenario_scaling(base, spec, rounds, raw),
        }
        for key, fn in steps.items():
            if key not in parts:
                continue
            before = loadavg()
            log(f"session {key}: load average {before}")
            results[key] = fn()
            results[key]["load"] = {"before": before, "after": loadavg()}
        ok = True
    finally:
        reap_strays(base)
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            for path in base.iterdir():
                if path.suffix != ".log" and not path.name.endswith("-state"):
                    with contextlib.suppress(OSError):
                        path.unlink() if not path.is_dir() else shutil.rmtree(path)
            log(f"session scenario failed; daemon logs kept in {base}")
    return results


def report(results: dict[str, Any]) -> str:
    import session_read

    out = session_read.report(results)
    if "begin" in results:
        b = results["begin"]
        out.append(
            f"\n== session begin/end: {b['cycles']} cycles each, disks of "
            f"{b['disk_size'] / GiB:.0f} GiB, {b['writes']:,} dirty 4 KiB blocks per disk "
            f"since c1 (load {b['load']['before']} -> {b['load']['after']}) =="
        )
        out.append(b["table"])
        out.append(f"set-up: {fmt_setup(b['setup'])}")
    if "map" in results:
        m = results["map"]
        out.append(
            f"\n== session map: whole-disk dirty map of a {m['size'] / GiB:,.0f} GiB qcow2, "
            f"{m['writes']:,} dirty blocks since c1: {m['extents']:,} extents "
            f"(load {m['load']['before']} -> {m['load']['after']}) =="
        )
        out.append(m["table"])
        out.append(f"set-up: {fmt_setup(m['setup'])}")
    if "scaling" in results:
        import scaling

        out += scaling.report(results["scaling"])
    return "\n".join(out)


def fmt_setup(setup: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in setup.items())
