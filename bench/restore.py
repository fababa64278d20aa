"""Restore benchmarks (``bench/run.py --only restore``), unix sockets, servers interleaved:

* ``restore write``: nbdcopy writes a file of random data (1 GiB; 64 MiB quick) into a new
  qcow2 image through nbdsrv's ``restore/ID`` (nbdsrv → its own qemu-storage-daemon) and
  through ``qemu-nbd`` serving a new qcow2 writable directly (``-e 8``: several
  connections, as nbdcopy opens); the ratio is nbdsrv's throughput over qemu-nbd's.
* ``live restore``: the same file served read-only by ``qemu-nbd``; nbdsrv's ``restore
  begin --source`` until ``ready`` (QEMU's block-stream) against ``qemu-img convert`` from
  the same source into a new qcow2; and the time from ``restore begin`` (sent over the control
  socket by the nbdsrv client library) to the first 4 KiB read through ``restore/ID``.

Work files live in ``bench/work/restore/``, removed at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from run import WORK, BenchError, GiB, MiB, log, make_random_file, nbdsrv_bin, stats, table

from nbdsrv.client import Client

RESTORE_WORK = WORK / "restore"


def _run(argv: list[str], timeout: float = 600) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} timed out") from e
    if out.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {out.stderr.strip()[-300:]}")
    return out.stdout


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if path.exists():
            return
        if proc.poll() is not None:
            raise BenchError(f"{proc.args} exited with {proc.returncode}")
        time.sleep(0.025)
    raise BenchError(f"{path} did not appear")


class _Daemon:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.control = work / "control.sock"
        self.socket = work / "nbd.sock"
        self.proc = subprocess.Popen(
            [
                *(str(nbdsrv_bin()), "daemon", "--state-dir", str(work / "state")),
                *("--control", str(self.control), "--listen", f"unix:{self.socket}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "daemon.log", "ab"),  # noqa: SIM115 - the child keeps it
        )
        _wait_socket(self.control, self.proc)

    def cli(self, *args: str) -> str:
        return _run([str(nbdsrv_bin()), *args, "--control", str(self.control)])

    def json(self, *args: str) -> Any:
        import json

        return json.loads(self.cli(*args, "--json"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _qemu_nbd(args: list[str], socket: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["qemu-nbd", *args, "-k", str(socket)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_socket(socket, proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], socket: Path) -> None:
    proc.terminate()
    proc.wait(30)
    socket.unlink(missing_ok=True)


def _new_qcow2(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])


def _write_nbdsrv(daemon: _Daemon, data: Path, image: Path, size: int) -> float:
    image.unlink(missing_ok=True)
    began = daemon.json("restore", "begin", "--image", str(image), "--size", str(size))
    start = time.perf_counter()
    _run(["nbdcopy", str(data), began["uri"]])
    elapsed = time.perf_counter() - start
    daemon.cli("restore", "end", began["id"])
    return elapsed


def _write_qemu_nbd(work: Path, data: Path, image: Path, size: int) -> float:
    _new_qcow2(image, size)
    socket = work / "qemu-nbd.sock"
    proc = _qemu_nbd(["-f", "qcow2", "-x", "disk", "-e", "8", "-t", str(image)], socket)
    try:
        start = time.perf_counter()
        _run(["nbdcopy", str(data), f"nbd+unix:///disk?socket={socket}"])
        return time.perf_counter() - start
    finally:
        _stop(proc, socket)


def _live_nbdsrv(daemon: _Daemon, source: str, image: Path) -> tuple[float, float]:
    """(seconds from the begin request until ready, seconds from it to the first read
    served). The begin and the looks at the session go over the control socket from here,
    as a backup product's own code would (the nbdsrv client library): a CLI process's start
    (Python, 0.1-0.3 s here) is not part of the copy."""
    image.unlink(missing_ok=True)
    with Client(control=str(daemon.control)) as control:
        start = time.perf_counter()
        began = control.restore_begin(image=str(image), source=source)
        _run(["qemu-io", "-f", "raw", "-c", "read 0 4k", str(began["uri"])])
        first_read = time.perf_counter() - start
        while True:
            [info] = [s for s in control.restore_list() if s["id"] == began["id"]]
            if info["state"] == "ready":
                break
            if info["state"] == "failed":
                raise BenchError(f"live restore failed: {info['error']}")
            time.sleep(0.01)
        ready = time.perf_counter() - start
        control.restore_end(began["id"])
    return ready, first_read


def _convert(source: str, image: Path) -> float:
    image.unlink(missing_ok=True)
    start = time.perf_counter()
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", source, str(image)])
    return time.perf_counter() - start


def scenario_restore(quick: bool, rounds: int, size: int, read_path: Path) -> dict[str, Any]:
    make_random_file(read_path, size)
    shutil.rmtree(RESTORE_WORK, ignore_errors=True)
    RESTORE_WORK.mkdir(parents=True)
    daemon = _Daemon(RESTORE_WORK)
    source_socket = RESTORE_WORK / "source.sock"
    source_proc = None
    write: dict[str, list[float]] = {"nbdsrv restore/ID": [], "qemu-nbd": []}
    live: dict[str, list[float]] = {"nbdsrv live restore": [], "qemu-img convert": []}
    first_reads: list[float] = []
    try:
        image = RESTORE_WORK / "target.qcow2"
        for i in range(rounds):
            log(f"restore write round {i + 1}/{rounds}")
            order = [0, 1] if i % 2 == 0 else [1, 0]
            for which in order:
                if which == 0:
                    write["nbdsrv restore/ID"].append(_write_nbdsrv(daemon, read_path, image, size))
                else:
                    write["qemu-nbd"].append(_write_qemu_nbd(RESTORE_WORK, read_path, image, size))
        source_proc = _qemu_nbd(
            ["-r", "-t", "-e", "8", "-f", "raw", "-x", "backup", str(read_path)], source_socket
        )
        source = f"nbd+unix:///backup?socket={source_socket}"
        for i in range(rounds):
            log(f"live restore round {i + 1}/{rounds}")
            order = [0, 1] if i % 2 == 0 else [1, 0]
            for which in order:
                if which == 0:
                    ready, first = _live_nbdsrv(daemon, source, image)
                    live["nbdsrv live restore"].append(ready)
                    first_reads.append(first)
                else:
                    live["qemu-img convert"].append(_convert(source, image))
    finally:
        if source_proc is not None:
            _stop(source_proc, source_socket)
        daemon.stop()
    shutil.rmtree(RESTORE_WORK, ignore_errors=True)
    return {
        "size": size,
        "write": {k: stats(v) for k, v in write.items()},
        "live": {k: stats(v) for k, v in live.items()},
        "first_read": stats(first_reads),
        "write_ratio": write_ratio(write),
        "live_ratio": statistics_ratio(live["qemu-img convert"], live["nbdsrv live restore"]),
    }


def write_ratio(write: dict[str, list[float]]) -> float:
    return statistics_ratio(write["qemu-nbd"], write["nbdsrv restore/ID"])


def statistics_ratio(reference: list[float], ours: list[float]) -> float:
    """Our throughput over the reference's (medians of the times)."""
    import statistics

    return statistics.median(reference) / statistics.median(ours)


def report(result: dict[str, Any]) -> str:
    size = result["size"]
    rows = []
    for part, key in (("write 1 image", "write"), ("live restore copy", "live")):
        for name, s in result[key].items():
            rows.append(
                (
                    part,
                    name,
                    "",
                    f"{s['median']:.2f}",
                    f"{size / MiB / s['median']:.0f}",
                    f"{s['min']:.2f}-{s['max']:.2f}",
                )
            )
    lines = [
        f"== restore: {size / GiB:.2f} GiB of random data, unix sockets ==",
        table(("part", "server", "", "median s", "MiB/s", "range s"), rows),
        f"write through restore/ID vs qemu-nbd writable: {result['write_ratio']:.2f}x",
        f"live restore copy vs qemu-img convert from the same source: {result['live_ratio']:.2f}x",
        f"restore begin (control socket) to the first 4 KiB read served: "
        f"{result['first_read']['median']:.3f} s (median)",
    ]
    return "\n".join(lines)
