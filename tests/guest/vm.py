"""A real Linux guest under QEMU (TCG), attached the way modern command lines and libvirt do:

    -blockdev driver=file,filename=data.qcow2,node-name=data-file
    -blockdev driver=qcow2,file=data-file,node-name=data
    -device virtio-blk-pci,drive=data,id=vdisk0          → the guest's /dev/vda, ext4, on /data
    -chardev socket,path=qga.sock,…,id=qga0 -device virtio-serial
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0   → qemu-ga in the guest
    -qmp unix:vm.qmp   (for nbdsrv: a monitor it has to itself)
    -qmp unix:test.qmp (for the test)

KVM is not usable on these machines (docs/architecture.md "Facts"), so the guest runs under TCG;
it boots in a few seconds. The test drives it through the agent.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import time
from pathlib import Path

from qemu.qmp import QMPError

from tests.guest.agent import AgentError, GuestAgent
from tests.guest.build import Guest
from tests.harness.qmp import SyncQMP
from tests.harness.tools import require_tool, run

MiB = 1024 * 1024
DATA_DISK_SIZE = 64 * MiB
DISK_ID = "vdisk0"
# Quiet, and no work a test guest does not need (boot is CPU-bound under TCG).
KERNEL_ARGS = "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests tsc=reliable"
BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core machine; a few seconds when idle


def make_data_disk(path: Path, size: int = DATA_DISK_SIZE) -> None:
    """An empty ext4 file system in a qcow2 image, made on the host."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    # Inode tables and journal written now, so the guest's kernel does not write them lazily
    # in the background while the test compares points in time.
    run([require_tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-L", "data",
         "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)])  # fmt: skip
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()


class GuestVM:
    """The guest's QEMU, its data disk and the test's handles on it (QMP, agent)."""

    def __init__(self, workdir: Path, guest: Guest) -> None:
        self.workdir = workdir
        self.guest = guest
        self.disk = workdir / "data.qcow2"
        self.qmp_path = workdir / "vm.qmp"
        self.test_qmp_path = workdir / "test.qmp"
        self.agent_path = workdir / "qga.sock"
        self.console = workdir / "console.log"
        self.pidfile = workdir / "qemu.pid"
        self.qmp: SyncQMP | None = None
        self.agent: GuestAgent | None = None

    def argv(self) -> list[str]:
        return [
            require_tool("qemu-system-x86_64"),
            "-accel", "tcg", "-machine", "q35", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console}",
            "-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd),
            "-append", KERNEL_ARGS,
            *self.disk_argv(),
            "-chardev", f"socket,path={self.agent_path},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off",
            "-daemonize", "-pidfile", str(self.pidfile),
        ]  # fmt: skip

    def disk_argv(self) -> list[str]:
        """The data disk and its guest device."""
        return [
            "-blockdev", f"driver=file,filename={self.disk},node-name=data-file",
            "-blockdev", "driver=qcow2,file=data-file,node-name=data",
            "-device", f"virtio-blk-pci,drive=data,id={DISK_ID}",
        ]  # fmt: skip

    def start(self) -> None:
        """Boot, and return once the guest agent answers (so /data is mounted)."""
        make_data_disk(self.disk)
        self.launch()
        self.wait_booted()

    def launch(self) -> None:
        """Start QEMU (the guest begins to boot) and connect the test's monitor."""
        run(self.argv())
        self.qmp = SyncQMP(str(self.test_qmp_path))

    def wait_booted(self) -> None:
        """Return once the guest agent answers and /data is mounted."""
        self.connect_agent(BOOT_TIMEOUT)
        assert self.agent is not None
        mounts = self.agent.check("cat /proc/mounts")
        assert " /data ext4 " in mounts, f"{mounts}\nconsole:\n{self.console_text()}"

    def connect_agent(self, timeout: float = 30.0) -> None:
        """Connect to the guest agent and wait until it answers."""
        self.agent = GuestAgent(str(self.agent_path))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent.sync(timeout=5.0)
                return
            except AgentError:
                if not self._alive() or time.monotonic() > deadline:
                    raise AgentError(
                        f"the guest agent does not answer; console:\n{self.console_text()}"
                    ) from None

    def disconnect_agent(self) -> None:
        """Leave the agent's channel to another client (it serves one at a time)."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _alive(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def write_file(self, name: str, data: bytes, *, in_place: bool = False) -> None:
        """The guest writes `data` to /data/`name` and syncs: once this returns, the file is
        on the disk as far as the guest is concerned. A new file is written aside and renamed
        into place; `in_place` overwrites the blocks of the existing file instead (same size),
        so the old data live on only in what a backup saved before."""
        assert self.agent is not None
        path = f"/data/{name}"
        if in_place:
            script = f"dd of={path} bs=4096 conv=notrunc,fsync 2>/dev/null && sync"
        else:
            script = f"cat > {path}.tmp && mv {path}.tmp {path} && sync"
        result = self.agent.execute(
            "guest-exec",
            path="/bin/sh",
            arg=["-c", script],
            **{"input-data": base64.b64encode(data).decode()},
        )
        self._wait(result["pid"], f"write {path}")

    def remove_file(self, name: str) -> None:
        assert self.agent is not None
        self.agent.check(f"rm /data/{name} && sync")

    def start_churn(self) -> int:
        """A guest process that rewrites files under /data/busy/ with fsync until
        `stop_churn`, so that a point in time falls among writes in flight (the journal then
        needs a replay). Returns its pid."""
        assert self.agent is not None
        script = (
            "mkdir -p /data/busy && rm -f /run/stop-churn && i=0 && "
            "while [ ! -e /run/stop-churn ]; do "
            "dd if=/dev/zero of=/data/busy/f$((i % 4)) bs=64k count=4 conv=fsync 2>/dev/null; "
            "i=$((i + 1)); done"
        )
        return int(self.agent.execute("guest-exec", path="/bin/sh", arg=["-c", script])["pid"])

    def stop_churn(self, pid: int) -> None:
        assert self.agent is not None
        self.agent.check("touch /run/stop-churn")
        self._wait(pid, "churn")

    def _wait(self, pid: int, what: str) -> None:
        assert self.agent is not None
        deadline = time.monotonic() + 60
        while True:
            status = self.agent.execute("guest-exec-status", pid=pid)
            if status["exited"]:
                if status.get("exitcode") != 0:
                    err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                    raise AgentError(f"guest: {what} failed: {status} {err}")
                return
            if time.monotonic() > deadline:
                raise AgentError(f"guest: {what} still running after 60 s")
            time.sleep(0.02)

    def shut_down(self, timeout: float = 60.0) -> None:
        """A clean shutdown: the guest unmounts /data (so ext4 marks it clean), then powers
        the machine off and QEMU exits (`-no-reboot`)."""
        assert self.agent is not None
        self.agent.check("umount /data")
        # No answer comes back: the machine is gone before the command ends.
        self.agent.execute("guest-exec", path="/bin/busybox", arg=["poweroff", "-f"])
        self.disconnect_agent()
        deadline = time.monotonic() + timeout
        while self._alive():
            if time.monotonic() > deadline:
                raise AgentError(f"the guest did not power off in {timeout:g} s")
            time.sleep(0.05)
        if self.qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError):
                self.qmp.close()
            self.qmp = None

    def stop(self) -> None:
        """Power off (or kill) QEMU; safe to call twice."""
        self.disconnect_agent()
        if self.qmp is not None:
            try:
                self.qmp.quit()
            except (QMPError, OSError, EOFError):  # QEMU is gone already
                with contextlib.suppress(QMPError, OSError, EOFError):
                    self.qmp.close()
            self.qmp = None
        deadline = time.monotonic() + 10
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = self._pid()
        if pid is not None and self._alive():
            os.kill(pid, signal.SIGKILL)  # daemonized: not our child, nothing to reap
