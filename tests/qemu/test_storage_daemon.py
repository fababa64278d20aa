"""StorageDaemon against a real qemu-storage-daemon."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import sys
from pathlib import Path

import pytest

from nbdsrv.qemu.chain import discover_chains
from nbdsrv.qemu.errors import ImageError, QEMUGoneError, QMPError, StorageDaemonError
from nbdsrv.qemu.images import detect_format
from nbdsrv.qemu.storage_daemon import StorageDaemon
from tests.harness.tools import run

from .conftest import Exits, make_image, qemu_io, require_tool


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


async def test_start_opens_images_and_exports_live_disks(qsd: StorageDaemon) -> None:
    assert [(i.format, i.node, i.file_node) for i in qsd.images] == [
        ("qcow2", "disk0", "disk0-file"),
        ("raw", "disk1", "disk1-file"),
    ]
    assert qsd.disks == ("disk0", "disk1")
    assert qsd.running and qsd.pid is not None and qsd.returncode is None
    exports = await qsd.monitor.execute("query-block-exports")
    # Each export sits on a passthrough throttle node over the format node (where a backup
    # session switches its copy-before-write filter in).
    assert sorted((e["id"], e["node-name"]) for e in exports) == [
        ("disk0", "disk0-live"),
        ("disk1", "disk1-live"),
    ]
    drivers = {
        n["node-name"]: n["drv"]
        for n in await qsd.monitor.execute("query-named-block-nodes", {"flat": True})
    }
    assert drivers["disk0-live"] == drivers["disk1-live"] == "throttle"


async def test_live_socket_is_only_for_the_daemon_user(qsd: StorageDaemon) -> None:
    mode = os.stat(qsd.live_socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_persistent_bitmap_on_qcow2_works(qsd: StorageDaemon) -> None:
    await qsd.monitor.execute(
        "block-dirty-bitmap-add", {"node": "disk0", "name": "c1", "persistent": True}
    )
    chains = await discover_chains(qsd.monitor)
    bitmap = chains["disk0"][0].bitmap("c1")
    assert bitmap is not None and bitmap.persistent and bitmap.recording


async def test_persistent_bitmap_on_raw_fails_clearly(qsd: StorageDaemon) -> None:
    with pytest.raises(QMPError, match=r"^block-dirty-bitmap-add failed: Can.t store persistent"):
        await qsd.monitor.execute(
            "block-dirty-bitmap-add", {"node": "disk1", "name": "c1", "persistent": True}
        )


async def test_writes_through_live_export_dirty_a_bitmap(qsd: StorageDaemon) -> None:
    await qsd.monitor.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "c1"})
    await qemu_io(qsd.live_uri("disk0"), "write -P 0x11 0 64k")
    await qemu_io(qsd.live_uri("disk0"), "write -P 0x22 1M 4k")
    bitmap = (await discover_chains(qsd.monitor))["disk0"][0].bitmap("c1")
    assert bitmap is not None
    assert bitmap.count == 2 * 65536


async def test_persistent_bitmap_survives_stop_and_start(qsd: StorageDaemon) -> None:
    await qsd.monitor.execute(
        "block-dirty-bitmap-add", {"node": "disk0", "name": "c1", "persistent": True}
    )
    await qemu_io(qsd.live_uri("disk0"), "write -P 0x11 0 64k")
    await qsd.stop()
    await qsd.start()
    bitmap = (await discover_chains(qsd.monitor))["disk0"][0].bitmap("c1")
    assert bitmap is not None
    assert (bitmap.count, bitmap.persistent, bitmap.inconsistent) == (65536, True, False)


async def test_sigkill_is_reported_and_monitor_says_qemu_went_away(
    qsd: StorageDaemon, exits: Exits
) -> None:
    assert qsd.pid is not None
    os.kill(qsd.pid, signal.SIGKILL)
    await asyncio.wait_for(exits.event.wait(), 10)
    assert exits.calls[0][0] == -signal.SIGKILL
    assert qsd.returncode == -signal.SIGKILL
    for _ in range(100):
        if not qsd.monitor.connected:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(QEMUGoneError, match=f"^QEMU at {qsd.qmp_path} went away"):
        await qsd.monitor.execute("query-block")


async def test_unexpected_exit_report_carries_the_log_tail(
    qsd: StorageDaemon, exits: Exits
) -> None:
    with open(qsd.log_path, "ab") as f:  # stands in for QEMU's last words
        f.write(b"qemu-storage-daemon: something broke\n")
    assert qsd.pid is not None
    os.kill(qsd.pid, signal.SIGTERM)
    await asyncio.wait_for(exits.event.wait(), 10)
    assert "something broke" in exits.calls[0][1]


async def test_stop_leaves_no_process_and_no_sockets(qsd: StorageDaemon, exits: Exits) -> None:
    pid = qsd.pid
    assert pid is not None
    sockets = qsd.sockets()
    assert all(p.exists() for p in sockets)
    await qsd.stop()
    assert not alive(pid)
    assert qsd.returncode == 0
    assert not any(p.exists() for p in sockets)
    assert not qsd.monitor.connected
    assert exits.calls == []  # a stop is not an unexpected exit


async def test_start_again_after_a_crash(qsd: StorageDaemon, exits: Exits) -> None:
    assert qsd.pid is not None
    os.kill(qsd.pid, signal.SIGKILL)
    await asyncio.wait_for(exits.event.wait(), 10)
    await qsd.start()
    assert qsd.running
    assert await qsd.monitor.execute("query-block-exports")


async def test_missing_image_is_a_clear_error(state_dir: Path, tmp_path: Path) -> None:
    daemon = StorageDaemon("vm", [tmp_path / "nope.qcow2"], state_dir)
    with pytest.raises(ImageError, match=r"nope\.qcow2 does not exist"):
        await daemon.start()
    assert daemon.pid is None


async def test_unsupported_format_is_a_clear_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "v.vmdk", "vmdk")
    with pytest.raises(ImageError, match="is in vmdk format; only qcow2 and raw"):
        await detect_format(image)


async def test_detect_format(images: list[Path]) -> None:
    assert [await detect_format(p) for p in images] == ["qcow2", "raw"]


async def test_detect_format_of_an_image_in_use_says_why(
    qsd: StorageDaemon, images: list[Path]
) -> None:
    with pytest.raises(ImageError, match=r"cannot read image .*a\.qcow2: .*lock"):
        await detect_format(images[0])


async def test_failed_start_reports_qemus_message(
    qsd: StorageDaemon, images: list[Path], tmp_path: Path
) -> None:
    # The images are open (and locked) by `qsd`; a second daemon cannot take them.
    other_state = Path(str(qsd.state_dir) + "-2")
    second = StorageDaemon("vm2", images, other_state, formats=["qcow2", "raw"])
    try:
        with pytest.raises(StorageDaemonError, match=r"exited with status 1 while starting.*lock"):
            await second.start()
        assert second.returncode == 1
    finally:
        await second.stop()
        shutil.rmtree(other_state, ignore_errors=True)


async def test_missing_qsd_binary_is_a_clear_error(images: list[Path], state_dir: Path) -> None:
    daemon = StorageDaemon("vm", images, state_dir, qsd="/nonexistent/qemu-storage-daemon")
    with pytest.raises(StorageDaemonError, match="is not installed"):
        await daemon.start()


@pytest.mark.parametrize("tool", ["qemu-storage-daemon", "qemu-img", "qemu-io"])
def test_qemu_tool_runs_and_reports_its_version(tool: str) -> None:
    """The QEMU programs nbdsrv and these tests drive are installed and run."""
    out = run([require_tool(tool), "--version"])
    assert re.match(rf"{tool} version \d+\.\d+\.\d+", out), out


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


async def test_qsd_runs_in_its_own_session_with_umask_077(qsd: StorageDaemon) -> None:
    pid = qsd.pid
    assert pid is not None
    assert proc_status(pid)["Name"].startswith("qemu-storage-d")  # the wrapper exec'd QSD
    assert os.getsid(pid) == pid != os.getsid(0)
    assert proc_status(pid)["Umask"] == "0077"
    # The QMP sockets are never chmod'ed: that no one else may connect is the umask's work.
    assert stat.S_IMODE(os.stat(qsd.qmp_path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(qsd.log_path).st_mode) == 0o600


# A daemon that starts a QSD under uvloop (as nbdsrv's does), adds a persistent bitmap, says
# the QSD's pid and waits to be killed.
_DAEMON = """
import sys, uvloop
from nbdsrv.qemu.storage_daemon import StorageDaemon

async def main():
    qsd = StorageDaemon("vm", sys.argv[2:], sys.argv[1])
    await qsd.start()
    await qsd.monitor.execute(
        "block-dirty-bitmap-add", {"node": "disk0", "name": "c1", "persistent": True}
    )
    print(qsd.pid, flush=True)
    await qsd.monitor.execute("query-block")
    sys.stdin.read()

uvloop.run(main())
"""


async def test_qsd_closes_its_images_cleanly_when_the_daemon_is_killed(
    images: list[Path], state_dir: Path
) -> None:
    require_tool("qemu-storage-daemon")
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DAEMON,
        str(state_dir),
        *map(str, images),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert daemon.stdout is not None
    line = await asyncio.wait_for(daemon.stdout.readline(), 30)
    qsd_pid = int(line)
    try:
        assert alive(qsd_pid)
        daemon.kill()
        await daemon.wait()
        for _ in range(300):
            if not alive(qsd_pid):
                break
            await asyncio.sleep(0.05)
        assert not alive(qsd_pid)
    finally:
        if alive(qsd_pid):  # the test failed: leave no orphan behind
            os.kill(qsd_pid, signal.SIGKILL)
    # Closed cleanly (SIGTERM, not left running nor killed): the bitmap is stored, not in use.
    info = json.loads(run(["qemu-img", "info", "--output=json", str(images[0])]))
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in bitmaps] == [("c1", ["auto"])]
