"""The embedded default: a private qemu-storage-daemon (QSD) that nbdsrv starts and owns.

One QSD per VM, a child process of nbdsrv (never `--daemonize`d), opening the VM's images::

    <image0> ─ file "disk0-file" ─ format "disk0" ─ throttle "disk0-live" ─┐ writable NBD
    <image1> ─ file "disk1-file" ─ format "disk1" ─ throttle "disk1-live" ─┤ exports "disk0", …
                                                                            │ on <state-dir>/
                                                                            │ <VM>.live.sock (0600)

The throttle nodes pass everything through (group "nbdsrv-tg" has no limits). They are the
place where a backup session puts its copy-before-write filter into the writers' path: one
`blockdev-reopen` of all of them switches every disk at once (an export's own node cannot be
changed in QEMU 7.2). See nbdsrv/qemu/fleece.py.
    QMP for nbdsrv:  <state-dir>/<VM>.qmp.sock   (StorageDaemon.monitor)
    QMP for tests:   <state-dir>/<VM>.test-qmp.sock   (only with test_monitor=True)
    stderr/stdout:   <state-dir>/<VM>.qsd.log

Writers (a VM with `-drive driver=nbd,server.type=unix,server.path=…,export=disk0`, or
`qemu-io -f raw nbd+unix:///disk0?socket=…`) go through QEMU, so dirty bitmaps on the
format nodes record their writes. Format nodes are opened read-write, which persistent
bitmaps on qcow2 need. The process runs in its own session (a Ctrl-C on nbdsrv's terminal
does not kill it), with umask 077, and gets SIGTERM if nbdsrv dies, so its images are closed
cleanly: see nbdsrv/qemu/parent_death.py for how, without `preexec_fn`.

Facts checked on QSD 7.2: `--blockdev` and `--export` take JSON; `--chardev`, `--monitor`
and `--nbd-server` take `key=value` lists (a comma inside a value is written twice);
on SIGTERM it removes its QMP sockets but leaves the NBD server's socket behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import ImageError, QEMUError, StorageDaemonError
from .images import SUPPORTED_FORMATS, detect_format, one_line
from .monitor import Monitor
from .parent_death import dies_with_parent

log = logging.getLogger(__name__)

# A throttle group with no limits: its nodes only give a backup a node to reopen.
THROTTLE_GROUP = "nbdsrv-tg"
UNIX_PATH_MAX = 107
_LOG_MARK = "--- nbdsrv:"  # sun_path is 108 bytes with the terminating NUL

ExitCallback = Callable[[int, str], object]
"""Called as `callback(returncode, log_tail)` when QSD dies unexpectedly; may be async."""


@dataclass(frozen=True)
class Image:
    """One of the VM's images as the daemon opens it."""

    path: Path
    """Absolute path: the identity of the top layer (node names change across restarts)."""
    format: str
    """"qcow2" or "raw"."""
    node: str
    """Format node name, also the disk's name and its live export's name: "disk0", ..."""
    file_node: str
    """Protocol (file) node name under it: "disk0-file", ..."""
    live_node: str
    """Passthrough throttle node above it, where the live export sits: "disk0-live", ..."""


def _opt(value: str | os.PathLike[str]) -> str:
    """A value for a QEMU `key=value,...` option: commas are doubled."""
    return str(value).replace(",", ",,")


def describe_status(returncode: int) -> str:
    """'exited with status 1' or 'was killed by SIGKILL'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class StorageDaemon:
    """A private qemu-storage-daemon for one VM's images.

    Usage::

        qsd = StorageDaemon("vm1", ["/img/a.qcow2", "/img/b.raw"], state_dir,
                            on_exit=lambda rc, tail: ...)
        await qsd.start()            # detects formats, starts QSD, connects qsd.monitor
        await qsd.monitor.execute("query-block-exports")
        qsd.disks                    # ("disk0", "disk1"): format node = export name
        qsd.live_socket              # where writers connect
        await qsd.stop()

    `monitor` is the one QMP connection for nbdsrv (a QMP monitor serves one client at a
    time). It lives as long as this object: after an unexpected exit it keeps trying to
    reconnect, and a later `start()` brings it back (its `on_reconnect` then fires, so
    the owner can reconcile). `formats`, if given, overrides detection per image (None
    entries are detected); detection trusts the image header, which a raw image's guest
    could forge, so give formats when images come from untrusted guests.
    """

    def __init__(
        self,
        vm: str,
        images: Sequence[str | os.PathLike[str]],
        state_dir: str | os.PathLike[str],
        *,
        formats: Sequence[str | None] | None = None,
        test_monitor: bool = False,
        on_exit: ExitCallback | None = None,
        qsd: str = "qemu-storage-daemon",
        qemu_img: str = "qemu-img",
        start_timeout: float = 15.0,
        empty: bool = False,
    ) -> None:
        # empty: no images at start; nodes and exports come later over QMP (restore targets).
        if not images and not empty:
            raise ImageError(f"VM {vm} has no images")
        if formats is not None and len(formats) != len(images):
            raise ImageError(f"VM {vm}: {len(images)} images but {len(formats)} formats")
        for fmt in formats or ():
            if fmt is not None and fmt not in SUPPORTED_FORMATS:
                raise ImageError(f"format {fmt} is not supported; only qcow2 and raw are")
        self.vm = vm
        self.state_dir = Path(state_dir).absolute()
        self._paths = [Path(p).absolute() for p in images]
        self._formats: list[str | None] = list(formats) if formats else [None] * len(images)
        self.on_exit = on_exit
        self.qsd = qsd
        self.qemu_img = qemu_img
        self.start_timeout = start_timeout
        self.qmp_path = self.state_dir / f"{vm}.qmp.sock"
        self.test_qmp_path = self.state_dir / f"{vm}.test-qmp.sock" if test_monitor else None
        self.live_socket = self.state_dir / f"{vm}.live.sock"
        self.log_path = self.state_dir / f"{vm}.qsd.log"
        self.monitor = Monitor(str(self.qmp_path), name=f"qsd-{vm}")
        self._images: tuple[Image, ...] = ()
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"<StorageDaemon {self.vm} pid={self.pid} returncode={self.returncode}>"

    # ------------------------------------------------------------ properties

    @property
    def disks(self) -> tuple[str, ...]:
        """Disk names in image order: the format node names and live export names."""
        return tuple(f"disk{i}" for i in range(len(self._paths)))

    @property
    def images(self) -> tuple[Image, ...]:
        """The images with their formats and node names (empty before `start`)."""
        return self._images

    @property
    def pid(self) -> int | None:
        """Process id of the current (or last) QSD, None before `start`."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running; the exit status (negative: killed by that signal) after."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def live_uri(self, disk: str) -> str:
        """NBD URI of a live disk, e.g. `nbd+unix:///disk0?socket=/state/vm.live.sock`."""
        return f"nbd+unix:///{disk}?socket={self.live_socket}"

    def sockets(self) -> list[Path]:
        """Every unix socket this daemon creates."""
        return [p for p in (self.qmp_path, self.test_qmp_path, self.live_socket) if p]

    # -------------------------------------------------------------- starting

    def command(self) -> list[str]:
        """The qemu-storage-daemon command line (after `images` are known)."""
        argv = [self.qsd, "--object", f"throttle-group,id={THROTTLE_GROUP}"]
        for image in self._images:
            argv += [
                "--blockdev",
                json.dumps(
                    {"driver": "file", "filename": str(image.path), "node-name": image.file_node}
                ),
                "--blockdev",
                json.dumps(
                    {"driver": image.format, "file": image.file_node, "node-name": image.node}
                ),
                "--blockdev",
                json.dumps(
                    {
                        "driver": "throttle",
                        "throttle-group": THROTTLE_GROUP,
                        "file": image.node,
                        "node-name": image.live_node,
                    }
                ),
            ]
        monitors = [("nbdsrv", self.qmp_path)]
        if self.test_qmp_path is not None:
            monitors.append(("test", self.test_qmp_path))
        for ident, path in monitors:
            argv += [
                "--chardev",
                f"socket,id=qmp-{ident},path={_opt(path)},server=on,wait=off",
                "--monitor",
                f"chardev=qmp-{ident},mode=control",
            ]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={_opt(self.live_socket)}"]
        for image in self._images:
            export = {
                "type": "nbd",
                "id": image.node,
                "node-name": image.live_node,
                "name": image.node,
                "writable": True,
            }
            argv += ["--export", json.dumps(export)]
        return argv

    async def start(self) -> None:
        """Detect formats, start QSD, wait until its QMP monitor answers.

        Raises `ImageError` for an unusable image and `StorageDaemonError` (with QSD's own
        last words from its log) when it does not come up. Calling it while running does
        nothing; after an exit (or `stop`) it starts a new process.
        """
        if self.running:
            return
        for path in self.sockets():
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                raise StorageDaemonError(
                    f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; "
                    "use a shorter state directory"
                )
        images = []
        for i, (path, fmt) in enumerate(zip(self._paths, self._formats, strict=True)):
            if fmt is None:
                fmt = await detect_format(path, self.qemu_img)
            elif not path.exists():
                raise ImageError(f"image {path} does not exist")
            images.append(Image(path, fmt, f"disk{i}", f"disk{i}-file", f"disk{i}-live"))
        self._images = tuple(images)

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_sockets()
        await self._cancel_watcher()
        self._close_log()
        self._stopping = False
        # The user's only, like everything QSD itself creates (umask 077).
        descriptor = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._log = open(descriptor, "ab")  # noqa: SIM115 - closed in stop()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{_LOG_MARK} starting qemu-storage-daemon at {stamp}\n".encode())
        self._log.flush()
        argv = self.command()
        log.info("starting qemu-storage-daemon for %s: %s", self.vm, " ".join(argv))
        if shutil.which(self.qsd) is None:
            self._close_log()
            raise StorageDaemonError(f"{self.qsd} is not installed (package qemu-system-common)")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *dies_with_parent(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            self._close_log()
            raise StorageDaemonError(f"cannot start {self.qsd}: {e}") from None

        proc = self._proc
        connect = asyncio.create_task(self.monitor.connect(timeout=self.start_timeout))
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connect, exited):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, QEMUError):
                        await task
        if proc.returncode is not None or connect.cancelled() or connect.exception():
            error = None if connect.cancelled() else connect.exception()
            await self._kill()
            rc = proc.returncode
            status = describe_status(rc) if rc is not None else "did not answer"
            tail = one_line(self.log_tail(5)) or (str(error) if error else "no message")
            raise StorageDaemonError(
                f"qemu-storage-daemon for {self.vm} {status} while starting: {tail}"
            )
        # The umask already makes it 0600; say so explicitly, it is the access control.
        os.chmod(self.live_socket, 0o600)
        self._watcher = asyncio.create_task(self._watch(proc), name=f"qsd-watcher {self.vm}")
        log.info("qemu-storage-daemon for %s is up (pid %d)", self.vm, proc.pid)

    # -------------------------------------------------------------- stopping

    async def stop(self, timeout: float = 10.0) -> None:
        """Quit QSD (QMP `quit`, then SIGTERM, then SIGKILL) and remove its sockets.

        Persistent bitmaps are written to the qcow2 images on a clean quit.
        """
        self._stopping = True
        await self._cancel_watcher()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if self.monitor.connected:
                with contextlib.suppress(QEMUError):
                    await self.monitor.execute("quit", timeout=min(timeout, 5.0))
            await self.monitor.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("qemu-storage-daemon for %s ignored quit; terminating", self.vm)
                await self._kill(term_timeout=5.0)
        else:
            await self.monitor.close()
        self._remove_sockets()
        self._close_log()

    async def _kill(self, term_timeout: float = 2.0) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), term_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _cancel_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    def _remove_sockets(self) -> None:
        for path in self.sockets():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -------------------------------------------------------------- watching

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self._stopping:
            return
        tail = self.log_tail()
        log.error(
            "qemu-storage-daemon for %s %s unexpectedly; its log ends: %s",
            self.vm,
            describe_status(rc),
            tail.strip() or "(empty)",
        )
        if self.on_exit is None:
            return
        try:
            result = self.on_exit(rc, tail)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_exit callback for %s failed", self.vm)

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines QSD wrote to its log since it was last started."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                data = f.read()
        except OSError:
            return ""
        text = data.decode(errors="replace").splitlines()
        for i in range(len(text) - 1, -1, -1):
            if text[i].startswith(_LOG_MARK):
                text = text[i + 1 :]
                break
        return "\n".join(text[-lines:]) + ("\n" if text else "")
