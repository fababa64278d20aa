#!/usr/bin/env python3
"""Benchmark nbdsrv against qemu-nbd and nbdkit with real NBD clients.

Scenarios (each on a unix socket and on TCP to 127.0.0.1, servers interleaved round-robin):

* ``read``: a full read of a raw file of random data (1 GiB; page cache warmed first) with
  ``nbdcopy URI null:`` (libnbd, multi-conn) and with ``qemu-img convert`` into a ``null-co``
  target (QEMU's client: one connection, 8 coroutines).
* ``map``: ``nbdinfo --map`` of a whole large sparse file (64 GiB apparent size, 20,000
  small data regions); the extent lists must agree between servers or the run fails.
* ``libvirt``: a libvirt domain followed with ``--libvirt``: session reads against libvirt's
  own pull-mode export, begin/end against libvirt alone (``bench/libvirt_session.py``).
* ``session``: backup sessions on the embedded default (nbdsrv's own qemu-storage-daemon):
  reads through a session against QEMU's snapshot-access export over unix and TCP, and four
  sessions of four VMs read at once (``session-read``, ``bench/session_read.py``); time to
  begin and end a session (``session-begin``); the dirty map of a 1 TiB disk with 100,000
  dirty blocks against ``qemu-nbd -B`` (``session-map``) (``bench/sessions.py``).
* ``restore``: writing an image through ``restore/ID`` against ``qemu-nbd`` writable, and a
  live restore's background copy against ``qemu-img convert`` (``bench/restore.py``).

Work files live in ``bench/work/`` (git-ignored) and are reused when they already fit.
Servers are stopped and their sockets removed at the end, also on Ctrl-C or an error.

Usage: ``.venv/bin/python bench/run.py [--rounds N] [--quick]
[--only read|map|session|session-read|session-begin|session-map|libvirt|restore]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbdsrv.qemu.parent_death import dies_with_parent

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work"
GiB = 1 << 30
MiB = 1 << 20
SERVERS = ("nbdsrv", "qemu-nbd", "nbdkit")
TRANSPORTS = ("unix", "tcp")
EXPORT = "disk"
# --only session-X: parts of the session scenario (bench/sessions.py PARTS)
SESSION_PARTS = {
    "session-read": ("read", "multi"),
    "session-begin": ("begin",),
    "session-map": ("map",),
    "session-scaling": ("scaling",),
}


class BenchError(Exception):
    """A benchmark step failed; the message says which."""


# -- helpers --------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BenchError(f"{tool} not found (run `make deps`)")
    return path


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    except OSError as e:
        return f"unavailable ({e})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_info() -> dict[str, Any]:
    libnbd = first_line(["nbdinfo", "--version"])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nbdinfo", "--version"], capture_output=True, text=True, check=False)
        libnbd = "; ".join(out.stdout.split("\n")[:2]).strip("; ")
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "qemu-img": first_line(["qemu-img", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "libnbd": libnbd,
        "nbdsrv": first_line([str(nbdsrv_bin()), "--version"]),
        "nbdsrv tree": git_state(),
    }


def git_state() -> str:
    """The commit of the nbdsrv measured, and whether nbdsrv/ had uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    head = first_line([*git, "rev-parse", "--short", "HEAD"])
    with contextlib.suppress(OSError):
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "nbdsrv"], capture_output=True, check=False
        ).stdout.strip()
        return f"{head} (nbdsrv/ has uncommitted changes)" if dirty else head
    return head


def nbdsrv_bin() -> Path:
    venv = ROOT / ".venv" / "bin" / "nbdsrv"
    if venv.exists():
        return venv
    found = shutil.which("nbdsrv")
    return Path(found) if found else venv


# -- work files -----------------------------------------------------------------------------


def make_random_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size and path.stat().st_blocks * 512 >= size:
        log(f"reusing {path} ({size / GiB:.2f} GiB)")
        return
    log(f"writing {size / GiB:.2f} GiB of random data to {path}")
    tmp = path.with_suffix(".tmp")
    chunk = 16 * MiB
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@dataclass(frozen=True)
class SparseSpec:
    size: int
    regions: int
    region_size: int
    seed: int = 1


def make_sparse_file(path: Path, spec: SparseSpec) -> None:
    """``spec.regions`` data regions of ``spec.region_size`` at spread, 64 KiB-aligned
    offsets (one per equal stride, jittered), never touching each other; the rest holes."""
    meta = path.with_suffix(".json")
    want = {"size": spec.size, "regions": spec.regions, "region_size": spec.region_size}
    want["seed"] = spec.seed
    if path.exists() and meta.exists():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(meta.read_text()) == want and path.stat().st_size == spec.size:
                log(f"reusing {path}")
                return
    log(
        f"writing sparse {spec.size / GiB:.0f} GiB file with {spec.regions} data regions "
        f"of {spec.region_size // 1024} KiB to {path}"
    )
    align = 64 * 1024
    stride = spec.size // spec.regions
    if stride < spec.region_size + 2 * align:
        raise BenchError("sparse file: regions too dense")
    rng = random.Random(spec.seed)
    payload = rng.randbytes(spec.region_size)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, spec.size)
        slots = (stride - spec.region_size - align) // align
        for i in range(spec.regions):
            offset = i * stride + align + rng.randrange(slots) * align
            os.pwrite(fd, payload, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    meta.write_text(json.dumps(want))


def warm_cache(path: Path) -> None:
    log(f"warming the page cache with {path.name}")
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


# -- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    """One server program serving one file on a unix socket and on a TCP port."""

    name: str
    uris: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sockets: list[Path] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def spawn(self, cmd: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                dies_with_parent(cmd),  # SIGTERM when the harness dies, however it dies
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,  # Ctrl-C goes to the harness, which stops us in order
            )
        self.procs.append(proc)
        self.logs.append(log_path)
        return proc

    def check_alive(self) -> None:
        for proc, log_path in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{self.name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {proc.pid}) ignored SIGTERM, killing it")
                proc.kill()
                proc.wait()
        self.procs.clear()
        for path in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def wait_ready(server: Server, probe: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        if probe():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} not ready after {timeout:.0f} s")
        time.sleep(0.05)


def nbd_probe(uri: str) -> Callable[[], bool]:
    def probe() -> bool:
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, check=False)
        return r.returncode == 0

    return probe


def unix_uri(sock: Path) -> str:
    return f"nbd+unix:///{EXPORT}?socket={sock}"


def tcp_uri(port: int) -> str:
    return f"nbd://127.0.0.1:{port}/{EXPORT}"


def start_nbdsrv(image: Path, tag: str) -> Server:
    server = Server("nbdsrv")
    state = WORK / f"nbdsrv-{tag}-state"
    state.mkdir(exist_ok=True)
    sock, control, port = WORK / f"nbdsrv-{tag}.sock", WORK / f"nbdsrv-{tag}.ctl", free_port()
    server.sockets += [sock, control]
    cmd = [str(nbdsrv_bin()), "daemon", "--state-dir", str(state), "--control", str(control)]
    cmd += ["--listen", f"unix:{sock}", "--listen", f"tcp:127.0.0.1:{port}"]
    cmd += ["--file", f"{EXPORT}={image}"]
    server.spawn(cmd, WORK / f"nbdsrv-{tag}.log")
    status = [str(nbdsrv_bin()), "status", "--control", str(control)]

    def ready() -> bool:
        return subprocess.run(status, capture_output=True, check=False).returncode == 0

    wait_ready(server, ready)
    server.uris = {"unix": unix_uri(sock), "tcp": tcp_uri(port)}
    return server


def start_qemu_nbd(image: Path, tag: str) -> Server:
    """One qemu-nbd per transport: it listens on either a unix socket or TCP, not both."""
    server = Server("qemu-nbd")
    base = ["qemu-nbd", "-r", "-f", "raw", "-t", "-e", "8", "-x", EXPORT]
    sock, port = WORK / f"qemu-nbd-{tag}.sock", free_port()
    server.sockets.append(sock)
    server.spawn([*base, "-k", str(sock), str(image)], WORK / f"qemu-nbd-{tag}-unix.log")
    server.spawn(
        [*base, "-b", "127.0.0.1", "-p", str(port), str(image)], WORK / f"qemu-nbd-{tag}-tcp.log"
    )
    server.uris = {"unix": unix_uri(sock), "tcp": tcp_uri(port)}
    for uri in server.uris.values():
        wait_ready(server, nbd_probe(uri))
    return server


def start_nbdkit(image: Path, tag: str) -> Server:
    """One nbdkit per transport, in the foreground so that we own its pid."""
    server = Server("nbdkit")
    base = ["nbdkit", "--exit-with-parent", "-f", "-r"]
    sock, port = WORK / f"nbdkit-{tag}.sock", free_port()
    server.sockets.append(sock)
    server.spawn([*base, "-U", str(sock), "file", str(image)], WORK / f"nbdkit-{tag}-unix.log")
    server.spawn(
        [*base, "-i", "127.0.0.1", "-p", str(port), "file", str(image)],
        WORK / f"nbdkit-{tag}-tcp.log",
    )
    server.uris = {"unix": unix_uri(sock), "tcp": tcp_uri(port)}
    for uri in server.uris.values():
        wait_ready(server, nbd_probe(uri))
    return server


STARTERS: dict[str, Callable[[Path, str], Server]] = {
    "nbdsrv": start_nbdsrv,
    "qemu-nbd": start_qemu_nbd,
    "nbdkit": start_nbdkit,
}


@contextlib.contextmanager
def servers_on(image: Path, tag: str) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for name in SERVERS:
            log(f"starting {name} on {image.name}")
            started[name] = STARTERS[name](image, tag)
        yield started
    finally:
        for server in started.values():
            server.stop()


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Client:
    name: str
    argv: Callable[[str], list[str]]
    check: Callable[[str], Any] | None = None  # output -> a value that must agree


def run_client(client: Client, uri: str) -> tuple[float, Any]:
    cmd = client.argv(uri)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace")[-2000:]
        raise BenchError(f"{' '.join(cmd)} failed with {r.returncode}:\n{err}")
    value = client.check(r.stdout.decode()) if client.check else None
    return elapsed, value


def interleaved(
    servers: dict[str, Server],
    clients: Sequence[Client],
    rounds: int,
    warmup: bool,
    transports: Sequence[str] = TRANSPORTS,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """times[client][transport][server]; servers take turns, the first rotating each round.
    A server without a URI for a transport sits that transport out."""
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    for client in clients:
        for transport in transports:
            names = [name for name in servers if transport in servers[name].uris]
            per_server: dict[str, list[float]] = {name: [] for name in names}
            times.setdefault(client.name, {})[transport] = per_server
            reference: tuple[str, Any] | None = None
            if warmup:
                for name in names:
                    run_client(client, servers[name].uris[transport])
            for rnd in range(rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    servers[name].check_alive()
                    elapsed, value = run_client(client, servers[name].uris[transport])
                    per_server[name].append(elapsed)
                    if client.check is None:
                        continue
                    if reference is None:
                        reference = (name, value)
                    elif value != reference[1]:
                        raise BenchError(
                            f"{client.name} over {transport}: {name} disagrees with "
                            f"{reference[0]}: {describe(value)} vs {describe(reference[1])}"
                        )
            summary = "  ".join(
                f"{name} {statistics.median(ts):.3f}s" for name, ts in per_server.items()
            )
            log(f"{client.name} over {transport}: {summary}")
    return times


def describe(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return f"{value[0]} extents"
    return repr(value)[:200]


def parse_map(text: str) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """``nbdinfo --map`` lines ``offset length type description`` -> (count of lines, the
    extents with adjacent equal types merged) so that servers splitting a run differently
    still compare equal, while a different allocation does not."""
    merged: list[list[int]] = []
    lines = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        lines += 1
        offset, length, kind = int(parts[0]), int(parts[1]), int(parts[2])
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == offset:
            merged[-1][1] += length
        else:
            merged.append([offset, length, kind])
    return len(merged), tuple((o, n, k) for o, n, k in merged)


# -- reporting ------------------------------------------------------------------------------


def stats(ts: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 3) -> str:
    """Columns before ``left`` aligned left (labels), the rest right (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def report_read(times: dict[str, dict[str, dict[str, list[float]]]], size: int) -> str:
    rows, ratio_rows = [], []
    for client, by_transport in times.items():
        for transport, by_server in by_transport.items():
            for server, ts in by_server.items():
                s = stats(ts)
                rows.append(
                    [client, transport, server]
                    + [f"{s[k]:.3f}" for k in ("median", "min", "max")]
                    + [f"{size / GiB / s['median']:.2f}"]
                )
            ours = statistics.median(by_server["nbdsrv"])
            ratio_rows.append(
                [client, transport, ""]
                + [f"{statistics.median(by_server[o]) / ours:.2f}" for o in ("qemu-nbd", "nbdkit")]
            )
    out = table(["client", "transport", "server", "median s", "min s", "max s", "GiB/s"], rows)
    out += "\n\nthroughput ratios (median; >1 means nbdsrv faster):\n"
    out += table(["client", "transport", "", "nbdsrv/qemu-nbd", "nbdsrv/nbdkit"], ratio_rows)
    return out


def report_map(times: dict[str, dict[str, dict[str, list[float]]]], extents: int) -> str:
    rows = []
    for client, by_transport in times.items():
        for transport, by_server in by_transport.items():
            ours = statistics.median(by_server["nbdsrv"])
            for server, ts in by_server.items():
                s = stats(ts)
                ratio = "" if server == "nbdsrv" else f"{s['median'] / ours:.2f}"
                rows.append(
                    [client, transport, server]
                    + [f"{s[k]:.3f}" for k in ("median", "min", "max")]
                    + [f"{extents / s['median']:,.0f}", ratio]
                )
    headers = ["client", "transport", "server", "median s", "min s", "max s", "extents/s"]
    headers.append("nbdsrv/this")
    return table(headers, rows)


# -- scenarios ------------------------------------------------------------------------------


def qemu_img_convert(uri: str, size: int) -> list[str]:
    """QEMU's own NBD client (one connection, 8 coroutines) into a target that drops writes;
    ``-n`` because ``null-co`` cannot be created, only opened."""
    target = f"driver=null-co,size={size}"
    return ["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", uri, target]


def scenario_read(path: Path, size: int, rounds: int) -> dict[str, Any]:
    make_random_file(path, size)
    warm_cache(path)
    clients = [
        Client("nbdcopy", lambda uri: ["nbdcopy", uri, "null:"]),
        Client("qemu-img", lambda uri: qemu_img_convert(uri, size)),
    ]
    with servers_on(path, "read") as servers:
        times = interleaved(servers, clients, rounds, warmup=True)
        cold = cold_read_latency(path, servers["nbdsrv"], WORK / "nbdsrv-read.ctl")
    warm_cache(path)
    text = report_read(times, size)
    text += (
        f"\n\ncold page cache: nbdcopy over unix read the file from nbdsrv in "
        f"{cold['read s']:.2f} s; "
        f"{cold['requests']} control requests (status) meanwhile, latency median "
        f"{cold['median ms']:.1f} ms, worst {cold['worst ms']:.1f} ms"
    )
    return {"size": size, "rounds": rounds, "times": times, "cold": cold, "table": text}


def control_status(path: Path) -> None:
    """One `status` request on nbdsrv's control socket (JSON lines)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        sock.sendall(b'{"op": "status", "args": {}}\n')
        with sock.makefile("rb") as f:
            if not json.loads(f.readline()).get("ok"):
                raise BenchError("status on the control socket failed")


def cold_read_latency(path: Path, server: Server, control: Path) -> dict[str, float]:
    """Evict the file from the page cache, read it through nbdsrv with nbdcopy, and time
    control requests sent meanwhile: disk reads must not hold up the event loop."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    latencies = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["nbdcopy", server.uris["unix"], "null:"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while proc.poll() is None:
            t = time.perf_counter()
            control_status(control)
            latencies.append(time.perf_counter() - t)
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"nbdcopy of the cold file failed with {proc.returncode}")
    latencies = latencies or [0.0]
    return {
        "read s": elapsed,
        "requests": len(latencies),
        "median ms": statistics.median(latencies) * 1000,
        "worst ms": max(latencies) * 1000,
    }


def scenario_map(path: Path, spec: SparseSpec, rounds: int) -> dict[str, Any]:
    make_sparse_file(path, spec)
    used = path.stat().st_blocks * 512
    log(f"sparse file: {spec.size / GiB:.0f} GiB apparent, {used / MiB:.0f} MiB used")
    seen: dict[str, int] = {}

    def check(out: str) -> tuple[int, tuple[tuple[int, int, int], ...]]:
        count, extents = parse_map(out)
        lines = sum(1 for line in out.splitlines() if line.strip())
        seen[str(lines)] = seen.get(str(lines), 0) + 1
        return count, extents

    clients = [Client("nbdinfo --map", lambda uri: ["nbdinfo", "--map", uri], check)]
    with servers_on(path, "map") as servers:
        # One untimed map from nbdsrv tells the number of extents that all must agree on.
        _, (extents, _) = run_client(clients[0], servers["nbdsrv"].uris["unix"])
        expected = 2 * spec.regions + 1
        if extents != expected:
            raise BenchError(f"nbdsrv reports {extents} extents, expected {expected}")
        times = interleaved(servers, clients, rounds, warmup=True)
    log(f"all servers agreed on {extents} extents (nbdinfo output line counts: {seen})")
    text = report_map(times, extents)
    return {
        "size": spec.size,
        "regions": spec.regions,
        "region_size": spec.region_size,
        "extents": extents,
        "rounds": rounds,
        "times": times,
        "table": text,
    }


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 1)")
    p.add_argument("--quick", action="store_true", help="small files, 1 round: a smoke run")
    p.add_argument("--json", metavar="FILE", help="save the results as JSON")
    p.add_argument(
        "--only",
        choices=("read", "map", "session", *SESSION_PARTS, "libvirt", "restore"),
        action="append",
        help="run only this scenario (repeatable)",
    )
    p.add_argument("--size-mib", type=int, default=None, help="read-scenario file size in MiB")
    return p.parse_args(argv)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1:
        print("bench: error: --rounds must be at least 1", file=sys.stderr)
        return 2
    size = (args.size_mib or (64 if args.quick else 1024)) * MiB
    spec = (
        SparseSpec(size=1 * GiB, regions=500, region_size=4096)
        if args.quick
        else SparseSpec(size=64 * GiB, regions=20_000, region_size=4096)
    )
    scenarios = args.only or ["read", "map", "session", "libvirt", "restore"]
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    try:
        for tool in ("qemu-nbd", "qemu-img", "nbdkit", "nbdcopy", "nbdinfo"):
            need(tool)
        if not nbdsrv_bin().exists():
            raise BenchError(f"{nbdsrv_bin()} not found (run `make deps`)")
        WORK.mkdir(exist_ok=True)
        info = machine_info()
        info["load average (1/5/15 min) at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        results: dict[str, Any] = {
            "machine": info,
            "command": " ".join(["bench/run.py", *(argv or sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "scenarios": {},
        }
        quick = "quick" if args.quick else "full"
        read_path = WORK / ("random-quick.raw" if args.quick else "random.raw")
        map_path = WORK / ("sparse-quick.raw" if args.quick else "sparse.raw")
        if "read" in scenarios:
            results["scenarios"]["read"] = scenario_read(read_path, size, rounds)
        if "map" in scenarios:
            results["scenarios"]["map"] = scenario_map(map_path, spec, rounds)
        parts = [p for only, ps in SESSION_PARTS.items() if only in scenarios for p in ps]
        if "session" in scenarios or parts:
            import sessions

            results["scenarios"]["session"] = sessions.scenario_session(
                args.quick,
                rounds,
                size,
                read_path,
                sessions.PARTS if "session" in scenarios else parts,
            )
        if "libvirt" in scenarios:
            import libvirt_session

            results["scenarios"]["libvirt"] = libvirt_session.scenario_libvirt(
                args.quick, rounds, size, read_path
            )
        if "restore" in scenarios:
            import restore

            results["scenarios"]["restore"] = restore.scenario_restore(
                args.quick, rounds, size, read_path
            )
        results["load_after"] = os.getloadavg()
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130

    print(f"\nnbdsrv benchmark ({quick} run, {rounds} round(s), servers interleaved)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    if "read" in results["scenarios"]:
        r = results["scenarios"]["read"]
        print(f"\n== full read of {r['size'] / GiB:.2f} GiB of random data (page cache warm) ==")
        print(r["table"])
    if "map" in results["scenarios"]:
        m = results["scenarios"]["map"]
        print(
            f"\n== nbdinfo --map of a {m['size'] / GiB:.0f} GiB sparse file, {m['regions']} "
            f"data regions of {m['region_size'] // 1024} KiB: {m['extents']} extents =="
        )
        print(m["table"])
    if "session" in results["scenarios"]:
        import sessions

        print()
        print(sessions.report(results["scenarios"]["session"]))
    if "libvirt" in results["scenarios"]:
        import libvirt_session

        print()
        print(libvirt_session.report(results["scenarios"]["libvirt"]))
    if "restore" in results["scenarios"]:
        import restore

        print()
        print(restore.report(results["scenarios"]["restore"]))
    print(
        "\nload average (1/5/15 min) at the end: "
        + " ".join(f"{x:.2f}" for x in results["load_after"])
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults saved to {args.json}")
    return 0


if __name__ == "__main__":
    # bench/sessions.py imports its helpers from `run`: let it find this module, not a copy
    # (a copy would have its own BenchError, which main() would not catch).
    sys.modules.setdefault("run", sys.modules[__name__])
    sys.exit(main())
