"""Pull-mode backup sessions end to end: real qemu-storage-daemon, real NBD clients, and
correctness by content against a byte-for-byte model of each disk."""

import contextlib
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from tests.harness.checksums import sha256
from tests.harness.daemon import DaemonProcess
from tests.harness.qsd import COPY_SCRIPT, DISK_SIZE, ExternalQSD, K, MiB, blocks
from tests.harness.tools import require_tool
from tests.harness.waiting import wait_for


def begin(nbdsrv: DaemonProcess, *args: str) -> dict[str, Any]:
    return dict(nbdsrv.json("backup", "begin", "vm1", *args))


def end(nbdsrv: DaemonProcess, session: dict[str, Any]) -> None:
    result = nbdsrv.cli("backup", "end", "vm1", session["id"])
    assert result.returncode == 0, result.stderr


def nbdcopy(uri: str, target: Path) -> bytes:
    subprocess.run([require_tool("nbdcopy"), uri, str(target)], check=True, timeout=120)
    return target.read_bytes()


def incremental(uri: str, context: str, target: Path) -> list[tuple[int, int]]:
    """Read only the dirty extents of ``context`` into ``target`` with libnbd."""
    require_tool("nbdsh")
    out = subprocess.run(
        ["/usr/bin/python3", str(COPY_SCRIPT), uri, context, str(target)],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    return [tuple(x) for x in json.loads(out)]  # type: ignore[misc]


def qemu_leftovers(vm: ExternalQSD) -> list[str]:
    """Anything of nbdsrv's sessions still in QEMU."""
    assert vm.qmp is not None
    nodes = [n["node-name"] for n in vm.qmp.cmd("query-named-block-nodes", flat=True)]
    jobs = [j["device"] for j in vm.qmp.cmd("query-block-jobs")]
    exports = [e["id"] for e in vm.qmp.cmd("query-block-exports")]
    return [x for x in nodes + jobs + exports if x.startswith("nbdsrv-")]


def test_full_backup_reads_the_point_in_time(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    vm.write(0, 0x11, 0, 1 * MiB)
    vm.write(0, 0x22, 5 * MiB, 256 * K)
    expected = bytes(vm.models[0])
    session = begin(nbdsrv)
    assert session["checkpoint"] and session["from"] is None
    assert session["disks"]["disk0"]["export"] == "vm1/disk0"
    assert session["disks"]["disk0"]["contexts"] == ["base:allocation"]
    # After the point in time: must never show in the export.
    vm.write(0, 0x33, 0, 8 * MiB)
    uri = nbdsrv.uri("vm1/disk0")
    assert sha256(nbdcopy(uri, workdir / "full.raw")) == sha256(expected)
    subprocess.run(
        [require_tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri,
         str(workdir / "convert.raw")],
        check=True, timeout=120,
    )  # fmt: skip
    assert sha256((workdir / "convert.raw").read_bytes()) == sha256(expected)
    end(nbdsrv, session)
    assert qemu_leftovers(vm) == []
    assert os.listdir(Path(nbdsrv.state_dir) / "scratch") == []
    assert [c["name"] for c in nbdsrv.checkpoints()] == [session["checkpoint"]]


def test_incremental_rounds_rebuild_every_point_in_time(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    rng = random.Random(4321)

    def random_writes(count: int) -> list[tuple[int, int]]:
        done = []
        for _ in range(count):
            offset = rng.randrange(0, DISK_SIZE // (4 * K)) * 4 * K
            length = min(rng.choice([4 * K, 16 * K, 64 * K, 200 * K]), DISK_SIZE - offset)
            vm.write(0, rng.randrange(1, 256), offset, length)
            done.append((offset, length))
        return done

    random_writes(20)
    session = begin(nbdsrv, "--checkpoint", "c0")
    image = workdir / "rebuilt.raw"
    expected = bytes(vm.models[0])
    # After the point in time: not in this backup, but in the next incremental.
    since_checkpoint = random_writes(5)
    assert sha256(nbdcopy(nbdsrv.uri("vm1/disk0"), image)) == sha256(expected)
    end(nbdsrv, session)
    for round_ in range(1, 4):
        written = since_checkpoint + random_writes(15)
        session = begin(nbdsrv, "--from", f"c{round_ - 1}", "--checkpoint", f"c{round_}")
        expected = bytes(vm.models[0])
        since_checkpoint = random_writes(5)
        context = f"qemu:dirty-bitmap:c{round_ - 1}"
        assert session["disks"]["disk0"]["contexts"] == ["base:allocation", context]
        dirty = incremental(nbdsrv.uri("vm1/disk0"), context, image)
        assert blocks(dirty) == blocks(written), f"round {round_}"
        assert sha256(image.read_bytes()) == sha256(expected), f"round {round_}"
        end(nbdsrv, session)
    assert qemu_leftovers(vm) == []


def test_dirty_map_matches_with_nbdinfo_and_qemu_img(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    vm.write(0, 0x44, 1 * MiB, 64 * K)
    vm.write(0, 0x45, 3 * MiB + 4 * K, 8 * K)
    session = begin(nbdsrv, "--from", "c1")
    uri = nbdsrv.uri("vm1/disk0")
    out = subprocess.run(
        [require_tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:c1", uri],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    dirty = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]
    assert dirty == [(1 * MiB, 64 * K), (3 * MiB, 64 * K)]
    image_opts = (
        f"driver=nbd,server.type=unix,server.path={nbdsrv.nbd_socket},export=vm1/disk0,"
        "x-dirty-bitmap=qemu:dirty-bitmap:c1"
    )
    out = subprocess.run(
        [require_tool("qemu-img"), "map", "--output=json", "--image-opts", image_opts],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    # qemu-img reads the dirty bit as a hole bit: dirty shows as "data": false.
    assert [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]] == dirty
    end(nbdsrv, session)


def test_all_checkpoints_offers_each_since_context(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    writes = {}
    for i in range(3):
        nbdsrv.json("checkpoint", "create", "vm1", "--name", f"c{i}")
        writes[f"c{i}"] = (i * 2 * MiB, 64 * K)
        vm.write(0, 0x50 + i, *writes[f"c{i}"])
    session = begin(nbdsrv, "--all-checkpoints", "--no-checkpoint")
    contexts = session["disks"]["disk0"]["contexts"]
    assert contexts == ["base:allocation"] + [f"qemu:dirty-bitmap:c{i}" for i in range(3)]
    assert session["checkpoint"] is None
    uri = nbdsrv.uri("vm1/disk0")
    for i in range(3):
        out = subprocess.run(
            [require_tool("nbdinfo"), "--json", f"--map=qemu:dirty-bitmap:c{i}", uri],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        dirty = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]
        assert dirty == [writes[f"c{j}"] for j in range(i, 3)]
    end(nbdsrv, session)
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c0", "c1", "c2"]


def test_bitmap_name_renames_the_context(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    session = begin(nbdsrv, "--from", "c1", "--bitmap-name", "backup-vda")
    assert session["disks"]["disk0"]["contexts"] == [
        "base:allocation",
        "qemu:dirty-bitmap:backup-vda",
    ]
    end(nbdsrv, session)


@pytest.mark.parametrize("vm", [("qcow2", "qcow2")], indirect=True)
def test_two_disks_share_one_point_in_time(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    vm.write(0, 0x61, 0, 1 * MiB)
    vm.write(1, 0x62, 2 * MiB, 1 * MiB)
    expected = [bytes(m) for m in vm.models]
    session = begin(nbdsrv)
    vm.write(0, 0x71, 0, 4 * MiB)
    vm.write(1, 0x72, 0, 4 * MiB)
    for i in range(2):
        data = nbdcopy(nbdsrv.uri(f"vm1/disk{i}"), workdir / f"d{i}.raw")
        assert sha256(data) == sha256(expected[i])
    end(nbdsrv, session)


def test_bad_begin_creates_nothing(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    assert nbdsrv.error("backup", "begin", "vm1", "--from", "nope") == "no checkpoint 'nope'"
    assert "--bitmap-name" in nbdsrv.error("backup", "begin", "vm1", "--bitmap-name", "x")
    assert nbdsrv.error("backup", "begin", "vmX") == "no VM named 'vmX'"
    assert [c["name"] for c in nbdsrv.checkpoints()] == ["c1"]
    assert qemu_leftovers(vm) == []
    assert vm.qmp is not None
    assert set(vm.qmp.bitmaps("disk0")) == {"c1"}
    scratch = Path(nbdsrv.state_dir) / "scratch"
    assert not scratch.exists() or os.listdir(scratch) == []


def test_invalid_from_checkpoint_is_refused(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c1")
    nbdsrv.json("checkpoint", "create", "vm1", "--name", "c2")
    assert vm.qmp is not None
    vm.qmp.cmd("block-dirty-bitmap-remove", node="disk0", name="c2")
    message = nbdsrv.error("backup", "begin", "vm1", "--from", "c1")
    assert "cannot be used" in message and "c2" in message
    assert qemu_leftovers(vm) == []


def test_one_session_per_vm(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    session = begin(nbdsrv)
    assert "already has a backup session" in nbdsrv.error("backup", "begin", "vm1")
    listed = nbdsrv.json("backup", "list", "vm1")
    assert [s["id"] for s in listed] == [session["id"]]
    assert listed[0]["state"] == "running"
    end(nbdsrv, session)
    assert nbdsrv.json("backup", "list", "vm1") == []
    assert "no backup session" in nbdsrv.error("backup", "end", "vm1", session["id"])


def test_ended_session_export_is_gone(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    session = begin(nbdsrv)
    uri = nbdsrv.uri("vm1/disk0")
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "h.pread(4096, 0)\n"
        "sys.stdin.readline()\n"
        "try:\n    h.pread(4096, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n"
    )
    reader = subprocess.Popen(
        ["/usr/bin/python3", "-c", script, uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # the reader is connected and has read once
        end(nbdsrv, session)
        out, _ = reader.communicate("go\n", timeout=60)
    finally:
        reader.kill()
    assert out.strip() == "ESHUTDOWN"
    result = subprocess.run(
        [require_tool("nbdinfo"), uri], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    # libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert "No such file or directory for export: vm1/disk0" in result.stderr


def test_daemon_restart_cleans_stale_session(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    begin(nbdsrv)
    assert qemu_leftovers(vm) != []
    assert nbdsrv.proc is not None
    nbdsrv.proc.kill()
    nbdsrv.proc.wait(30)
    nbdsrv.start()
    assert qemu_leftovers(vm) == []
    assert os.listdir(Path(nbdsrv.state_dir) / "scratch") == []
    assert nbdsrv.json("backup", "list", "vm1") == []


def test_qemu_gone_fails_session_with_eio(vm: ExternalQSD, nbdsrv: DaemonProcess) -> None:
    session = begin(nbdsrv)
    vm.kill()
    wait_for(
        lambda: nbdsrv.json("backup", "list", "vm1")[0]["state"] == "failed",
        "the session to fail",
    )
    listed = nbdsrv.json("backup", "list", "vm1")[0]
    assert listed["error"]
    result = subprocess.run(
        [require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read 0 4k", nbdsrv.uri("vm1/disk0")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Input/output error" in result.stdout + result.stderr
    vm.start()
    # Ending needs QEMU (else `backup end` fails and keeps the session): wait for it.
    wait_for(lambda: nbdsrv.status()["vms"][0]["qmp_connected"], "nbdsrv to reconnect")
    end(nbdsrv, session)


def read_snapshot(nbdsrv: DaemonProcess, command: str) -> str:
    result = subprocess.run(
        [require_tool("qemu-io"), "-r", "-f", "raw", "-c", command, nbdsrv.uri("vm1/disk0")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_copy_before_write_error_breaks_the_snapshot_not_the_guest(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    """blkdebug makes every write to the scratch image fail: the guest's write still
    succeeds (on-cbw-error=break-snapshot), the session fails with a reason, reads get EIO."""
    vm.write(0, 0x11, 0, 1 * MiB)
    nbdsrv.stop()
    nbdsrv.start(fault="scratch-write-error")
    session = begin(nbdsrv)
    vm.write(0, 0x99, 0, 64 * K)  # raises if the guest's write fails
    live = subprocess.run(
        [require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x99 0 64k",
         f"nbd+unix:///disk0?socket={vm.nbd_path}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert live.returncode == 0, live.stdout + live.stderr
    wait_for(
        lambda: nbdsrv.json("backup", "list", "vm1")[0]["state"] == "failed",
        "the session to fail",
    )
    assert (
        "can no longer read the point in time" in nbdsrv.json("backup", "list", "vm1")[0]["error"]
    )
    assert "Input/output error" in read_snapshot(nbdsrv, "read 0 64k")
    assert "Input/output error" in read_snapshot(nbdsrv, "read 4M 64k")  # never written
    end(nbdsrv, session)
    assert qemu_leftovers(vm) == []


def test_third_party_cannot_take_the_filter_out_while_exported(
    vm: ExternalQSD, nbdsrv: DaemonProcess
) -> None:
    """What a second monitor can do to a running session: QEMU refuses to take the filter
    out of the path or delete a node; deleting the export is allowed, and the session then
    fails (EIO) before the filter can leave the path. New data is never served."""
    vm.write(0, 0x11, 0, 1 * MiB)
    session = begin(nbdsrv)
    qmp = vm.qmp
    assert qmp is not None
    nodes = [n["node-name"] for n in qmp.cmd("query-named-block-nodes", flat=True)]
    cbw = next(n for n in nodes if n.startswith("nbdsrv-") and n.endswith("-cbw0"))
    acc = next(n for n in nodes if n.startswith("nbdsrv-") and n.endswith("-acc0"))
    back = [{"driver": "throttle", "node-name": "disk0-live", "throttle-group": "nbdsrv-tg",
             "file": "disk0"}]  # fmt: skip
    for command, args in [
        ("blockdev-reopen", {"options": back}),
        ("blockdev-del", {"node-name": cbw}),
        ("blockdev-del", {"node-name": acc}),
    ]:
        with pytest.raises(ExecuteError):
            qmp.cmd(command, **args)
    assert qmp.cmd("query-block-jobs") == []  # nothing to cancel any more
    vm.write(0, 0x22, 0, 64 * K)
    out = read_snapshot(nbdsrv, "read -P 0x11 0 64k")
    assert "read 65536/65536" in out and "verification failed" not in out, out
    export = next(
        e["id"]
        for e in qmp.cmd("query-block-exports")
        if e["id"] != "disk0" and not e["id"].endswith("-direct")  # nbdsrv's upstream one
    )
    with pytest.raises(ExecuteError, match="still in use"):  # nbdsrv is connected
        qmp.cmd("block-export-del", id=export)
    qmp.cmd("block-export-del", id=export, mode="hard")
    wait_for(
        lambda: nbdsrv.json("backup", "list", "vm1")[0]["state"] == "failed",
        "the session to fail",
    )
    # The direct export holds the snapshot-access node too (nbdsrv may have deleted it
    # already); the rest nbdsrv leaves to the third party once it sees them at it.
    with contextlib.suppress(ExecuteError):
        qmp.cmd("block-export-del", id=f"{export}-direct", mode="hard")
    wait_for(lambda: len(qmp.cmd("query-block-exports")) == 1, "the direct export to go")
    qmp.cmd("blockdev-del", **{"node-name": acc})
    qmp.cmd("blockdev-reopen", options=back)
    vm.write(0, 0x33, 0, 64 * K)
    assert "Input/output error" in read_snapshot(nbdsrv, "read 0 64k")
    end(nbdsrv, session)
    assert qemu_leftovers(vm) == []


@pytest.mark.parametrize("vm", [("raw",)], indirect=True)
def test_raw_disk_full_backup_needs_no_checkpoint(
    vm: ExternalQSD, nbdsrv: DaemonProcess, workdir: Path
) -> None:
    vm.write(0, 0x77, 0, 1 * MiB)
    session = begin(nbdsrv, "--no-checkpoint")
    assert sha256(nbdcopy(nbdsrv.uri("vm1/disk0"), workdir / "full.raw")) == sha256(vm.models[0])
    end(nbdsrv, session)
    assert qemu_leftovers(vm) == []
