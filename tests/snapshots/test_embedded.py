"""The embedded default (`nbdsrv daemon --image`) across snapshots, commits and restarts: the
private qemu-storage-daemon reopens each disk from its newest top."""

import json
import subprocess
from pathlib import Path

from tests.harness.daemon import DaemonProcess, nbdsrv_argv
from tests.harness.timeline import Timeline
from tests.harness.tools import require_tool, run

K = 1024


def cli(control: str, *args: str) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(run(nbdsrv_argv(*args, "--control", control, "--json"))))


def dirty(uri: str, context: str) -> list[tuple[int, int]]:
    out = run([require_tool("nbdinfo"), "--json", f"--map={context}", uri])
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]


def test_snapshot_survives_daemon_restart_and_commit(workdir: Path) -> None:
    image = workdir / "disk.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "16M"])
    state, control = workdir / "state", str(workdir / "control.sock")
    nbd = workdir / "nbd.sock"
    args = ["--state-dir", str(state), "--control", control, "--listen", f"unix:{nbd}",
            "--image", f"vm={image}"]  # fmt: skip
    daemon = DaemonProcess(args, control, workdir / "daemon.log")
    live = f"nbd+unix:///disk0?socket={state / 'vm.live.sock'}"

    def write(pattern: int, offset: int) -> None:
        run([require_tool("qemu-io"), "-f", "raw", "-c", f"write -P {pattern} {offset} 64k", live])

    daemon.start()
    cli(control, "checkpoint", "create", "vm", "--name", "c1")
    write(0x11, 0)
    overlay = cli(control, "snapshot", "create", "vm")["overlays"]["disk0"]
    write(0x22, 1024 * K)
    assert daemon.stop() == 0
    daemon.start()  # must open the overlay, not the base
    read = subprocess.run(
        [require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x22 1M 64k", live],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "read 65536/65536" in read.stdout, read.stdout + read.stderr
    assert all(c["valid"] for c in cli_list(control))
    cli(control, "snapshot", "commit", "vm")
    assert not Path(overlay).exists()
    write(0x33, 2048 * K)
    session = cli(control, "backup", "begin", "vm", "--from", "c1", "--no-checkpoint")
    uri = f"nbd+unix:///vm/disk0?socket={nbd}"
    assert dirty(uri, "qemu:dirty-bitmap:c1") == [(0, 64 * K), (1024 * K, 64 * K),
                                                  (2048 * K, 64 * K)]  # fmt: skip
    # The copy-before-write filter sits in the embedded QSD's throttle node: live writes
    # after the point in time never show in the session.
    write(0x44, 0)
    run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", uri])
    run(nbdsrv_argv("backup", "end", "vm", session["id"], "--control", control))
    assert daemon.stop() == 0


def cli_list(control: str) -> list[dict]:  # type: ignore[type-arg]
    return list(json.loads(run(nbdsrv_argv("checkpoint", "list", "vm", "--control", control,
                                           "--json"))))  # fmt: skip


def test_commit_after_daemon_restart_goes_into_the_layer_below(workdir: Path) -> None:
    """base ← snap1 ← snap2 with checkpoints in each layer; the daemon restarts (its private
    QSD reopens the chain from the top, the middle layer read-only) and commits twice. The
    base is untouched by the first commit, the QSD reopens the right top after each one, and
    every "since" map and point in time stays exact."""
    image = workdir / "disk.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "16M"])
    state, control = workdir / "state", str(workdir / "control.sock")
    nbd = workdir / "nbd.sock"
    args = ["--state-dir", str(state), "--control", control, "--listen", f"unix:{nbd}",
            "--image", f"vm={image}"]  # fmt: skip
    daemon = DaemonProcess(args, control, workdir / "daemon.log")
    live = f"nbd+unix:///disk0?socket={state / 'vm.live.sock'}"
    timeline = Timeline(
        lambda *a: cli(control, *a) if a[:2] != ("checkpoint", "list") else cli_list(control),
        lambda export: f"nbd+unix:///{export}?socket={nbd}",
        "vm", "disk0", workdir,
    )  # fmt: skip

    def write(pattern: int, offset: int) -> None:
        run([require_tool("qemu-io"), "-f", "raw", "-c", f"write -P {pattern} {offset} 64k", live])
        timeline.wrote(offset, 64 * K, pattern)

    daemon.start()
    try:
        write(0x10, 0)
        timeline.full("c0")
        write(0x11, 1024 * K)
        overlays = []
        for i in (1, 2):
            overlays.append(cli(control, "snapshot", "create", "vm")["overlays"]["disk0"])
            write(0x20 + i, 2048 * K * i)
            timeline.checkpoint(f"c{i}")
            write(0x30 + i, 1024 * K + 64 * K * i)
        assert daemon.stop() == 0
        daemon.start()
        timeline.verify("after the restart")
        base = image.read_bytes()
        cli(control, "snapshot", "commit", "vm")
        assert not Path(overlays[1]).exists() and Path(overlays[0]).exists()
        assert image.read_bytes() == base, "the first commit must not write the base"
        write(0x41, 5 * 1024 * K)
        timeline.verify("after commit 1")
        assert daemon.stop() == 0
        daemon.start()  # must reopen snap1 as the top, over the unchanged base
        timeline.verify("after commit 1 and a restart")
        cli(control, "snapshot", "commit", "vm")
        assert not Path(overlays[0]).exists()
        write(0x42, 6 * 1024 * K)
        timeline.verify("after commit 2")
        assert daemon.stop() == 0
        daemon.start()
        timeline.verify("after commit 2 and a restart")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
