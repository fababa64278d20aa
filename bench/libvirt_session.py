"""libvirt benchmark (``bench/run.py --only libvirt``): a transient libvirt domain (TCG, no
guest OS) with one qcow2 disk full of random data, followed by ``nbdsrv daemon --libvirt``.

* ``libvirt read``: a full read of the disk through a backup session, nbdsrv's ``VM/vda``
  against libvirt's own pull-mode export (``vda`` on the job's socket in nbdsrv's state dir)
  in the same run, interleaved; ``nbdcopy URI null:`` and ``qemu-img convert`` into ``null-co``.
* ``libvirt begin/end``: how long ``backup begin`` and ``backup end`` take through the control
  socket, full and ``--from`` a checkpoint (``--no-checkpoint`` both), against libvirt's own
  ``virDomainBackupBegin`` + ``virDomainAbortJob`` (until the job is gone) through the binding.

Needs root and libvirt (``make deps``); starts ``virtlogd -d`` and ``libvirtd -d`` when no
libvirtd answers and stops them at the end. Work files live in a directory libvirt's QEMU can
reach (``/var/tmp/nbdsrv-bench-libvirt-*``), removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from run import (
    BenchError,
    Client,
    GiB,
    Server,
    interleaved,
    log,
    make_random_file,
    nbdsrv_bin,
    qemu_img_convert,
    stats,
    table,
    wait_ready,
)
from session_read import read_rows
from sessions import control_call, run

URI = "qemu:///system"
VM = "nbdsrv-bench"


def _answers() -> bool:
    r = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, check=False)
    return r.returncode == 0


@contextlib.contextmanager
def libvirtd() -> Iterator[None]:
    """A libvirtd that answers; started (and stopped afterwards) when none runs."""
    if _answers():
        yield
        return
    if os.geteuid() != 0:
        raise BenchError("no libvirtd runs and only root can start one")
    started = []
    for program, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(Path(pidfile).read_text()), 0)
            continue
        run([program, "-d"])
        for _ in range(200):
            if Path(pidfile).exists():
                break
            time.sleep(0.05)
        started.append(int(Path(pidfile).read_text()))
    try:
        deadline = time.monotonic() + 120
        while not _answers():
            if time.monotonic() > deadline:
                raise BenchError("libvirtd does not answer after 120 s")
            time.sleep(0.2)
        yield
    finally:
        for pid in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)


def binding() -> Any:
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import libvirt
    except ImportError as e:
        raise BenchError(f"python3-libvirt is missing ({e}): run `make deps`") from e
    libvirt.registerErrorHandler(lambda *_: None, None)
    return libvirt


def domain_xml(image: Path) -> str:
    return f"""<domain type='qemu'><name>{VM}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
  <memballoon model='none'/></devices></domain>"""


def wait_no_job(dom: Any, libvirt: Any) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return
        if time.monotonic() > deadline:
            raise BenchError("libvirt's backup job did not go")
        time.sleep(0.01)


def scenario_libvirt(quick: bool, rounds: int, size: int, raw: Path) -> dict[str, Any]:
    libvirt = binding()
    for tool in ("virsh", "libvirtd", "virtlogd", "qemu-img", "nbdcopy"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (run `make deps`)")
    make_random_file(raw, size)
    base = Path(tempfile.mkdtemp(prefix="nbdsrv-bench-libvirt-", dir="/var/tmp"))
    base.chmod(0o755)
    cycles = max(rounds, 2 if quick else 5)
    ok = False
    try:
        with libvirtd():
            image = base / "vda.qcow2"
            log(f"converting {raw.name} into {image} ({size / GiB:.2f} GiB qcow2)")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
            conn = libvirt.open(URI)
            t0 = time.perf_counter()
            dom = conn.createXML(domain_xml(image), 0)
            setup = {"domain start s": time.perf_counter() - t0}
            try:
                results = _measure(libvirt, dom, base, raw, size, rounds, cycles, setup)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                conn.close()
        ok = True
        return results
    finally:
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"libvirt bench failed; files kept in {base}")


def _measure(
    libvirt: Any,
    dom: Any,
    base: Path,
    raw: Path,
    size: int,
    rounds: int,
    cycles: int,
    setup: dict[str, float],
) -> dict[str, Any]:
    state = base / "state"
    control = state / "control.sock"
    sock = base / "nbd.sock"
    server = Server("nbdsrv (libvirt)")
    server.sockets += [sock, control]
    cmd = [str(nbdsrv_bin()), "daemon", "--state-dir", str(state), "--control", str(control)]
    server.spawn([*cmd, "--listen", f"unix:{sock}", "--libvirt", URI], base / "daemon.log")
    try:

        def ready() -> bool:
            with contextlib.suppress(BenchError, OSError):
                return any(v["name"] == VM for v in control_call(control, "status", {})["vms"])
            return False

        wait_ready(server, ready, timeout=60)

        def call(op: str, **args: Any) -> Any:
            server.check_alive()
            return control_call(control, op, args)

        # -- begin / end ------------------------------------------------------------------
        call("checkpoint-create", vm=VM, name="c1")
        # 16 MiB changed since c1 (the monitor command taints the bench domain; no matter).
        device = "/machine/peripheral/virtio-disk0/virtio-backend"
        hmp = f'qemu-io -d {device} "write -P 0x5a 0 16M"'
        run(["virsh", "-c", URI, "qemu-monitor-command", VM, "--hmp", hmp])
        begin_end: dict[str, dict[str, list[float]]] = {}
        for label, since in (("full", None), ("--from c1", "c1")):
            ours: dict[str, list[float]] = {"begin": [], "end": []}
            theirs: dict[str, list[float]] = {"begin": [], "end": []}
            jobdir = state / "libvirt" / VM
            xml = (
                "<domainbackup mode='pull'>"
                + (f"<incremental>{since}</incremental>" if since else "")
                + f"<server transport='unix' socket='{jobdir}/bench.sock'/><disks>"
                "<disk name='vda' backup='yes' type='file'"
                + (f" exportbitmap='{since}'" if since else "")
                + f"><scratch file='{jobdir}/bench-vda.qcow2'/></disk></disks></domainbackup>"
            )
            for _ in range(cycles):
                t0 = time.perf_counter()
                session = call("backup-begin", vm=VM, no_checkpoint=True, **{"from": since})
                ours["begin"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                call("backup-end", vm=VM, id=session["id"])
                ours["end"].append(time.perf_counter() - t0)
                # libvirt alone, through the binding, in the directory nbdsrv prepared.
                t0 = time.perf_counter()
                dom.backupBegin(xml, None, 0)
                theirs["begin"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dom.abortJob()
                wait_no_job(dom, libvirt)
                theirs["end"].append(time.perf_counter() - t0)
            begin_end[f"nbdsrv {label}"] = ours
            begin_end[f"libvirt {label}"] = theirs

        # -- read -------------------------------------------------------------------------
        session = call("backup-begin", vm=VM, no_checkpoint=True)
        ours_uri = session["disks"]["vda"]["uri"]
        theirs_uri = f"nbd+unix:///vda?socket={state}/libvirt/{VM}/nbd.sock"
        # Both must read as the disk did at the point in time (random data + 16 MiB of 0x5a).
        expected = base / "expected.raw"
        shutil.copyfile(raw, expected)
        with open(expected, "r+b") as f:
            f.write(b"\x5a" * (16 << 20))
        for uri in (ours_uri, theirs_uri):
            run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(expected), uri])
        expected.unlink()
        servers = {
            "nbdsrv": Server("nbdsrv", uris={"unix": ours_uri}, procs=server.procs,
                             logs=server.logs),
            "libvirt": Server("libvirt", uris={"unix": theirs_uri}, procs=server.procs,
                              logs=server.logs),
        }  # fmt: skip
        clients = [
            Client("nbdcopy", lambda uri: ["nbdcopy", uri, "null:"]),
            Client("qemu-img", lambda uri: qemu_img_convert(uri, size)),
        ]
        times = interleaved(servers, clients, rounds, warmup=True, transports=("unix",))
        call("backup-end", vm=VM, id=session["id"])
    finally:
        server.stop()
    return {
        "size": size,
        "rounds": rounds,
        "cycles": cycles,
        "setup": setup,
        "begin_end": begin_end,
        "times": times,
    }


def report(results: dict[str, Any]) -> str:
    size = results["size"]
    out = [
        f"== libvirt read: full read of a {size / GiB:.2f} GiB qcow2 of random data through a "
        "backup session, nbdsrv VM/vda vs libvirt's own pull-mode export =="
    ]
    rows, ratios = read_rows(results["times"], size, "libvirt")
    out.append(table(["client", "server", "median s", "min s", "max s", "GiB/s"], rows, left=2))
    ratio_rows = [[client, throughput] for client, throughput, _ in ratios]
    out.append(table(["client", "throughput nbdsrv/libvirt"], ratio_rows, left=1))
    out.append(
        f"\n== libvirt begin/end: {results['cycles']} cycles each, control socket vs the "
        "libvirt binding (end = until libvirt reports no job) =="
    )
    rows = []
    for label, phases in results["begin_end"].items():
        for phase in ("begin", "end"):
            s = stats(phases[phase])
            rows.append([label, phase] + [f"{s[k]:.3f}" for k in ("median", "min", "max")])
    out.append(table(["who", "phase", "median s", "min s", "max s"], rows, left=2))
    out.append(f"domain start: {results['setup']['domain start s']:.2f} s")
    return "\n".join(out)
