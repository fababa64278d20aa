"""A VM-like qemu-system-x86_64 with no guest (held at ``-S``), daemonized in a short
directory: one QMP socket for nbdsrv (``qmp_path``) and one for the test (``qmp``), through
which the test writes on the disks' BlockBackends with HMP ``qemu-io``, as a guest's writes
would go through its devices."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tests.harness.dirs import short_tmp_dir
from tests.harness.qmp import SyncQMP
from tests.harness.tools import require_tool, run
from tests.harness.waiting import wait_for


class QemuSystem:
    """``qemu-system-x86_64 ARGS`` (machine, disks, devices) with the two monitors."""

    def __init__(self, workdir: Path, args: Sequence[str]) -> None:
        self.qmp_path = workdir / "vm.qmp"
        test_qmp = workdir / "test.qmp"
        self.pidfile = workdir / "qemu.pid"
        run([
            require_tool("qemu-system-x86_64"), *args,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{test_qmp},server=on,wait=off",
            "-daemonize", "-pidfile", str(self.pidfile),
        ])  # fmt: skip
        wait_for(test_qmp.exists, "QEMU's monitor")
        self.qmp = SyncQMP(str(test_qmp))

    def qemu_io(self, target: str, command: str) -> None:
        """HMP ``qemu-io TARGET "COMMAND"`` (TARGET a drive, or ``-d`` and a device's QOM
        path). QEMU 7.2 prints qemu-io's success to its own stdout; the reply is empty unless
        something failed."""
        out = self.qmp.hmp(f'qemu-io {target} "{command}"')
        assert "error" not in out.lower() and "failed" not in out.lower(), out

    def nbdsrv_nodes(self) -> list[str]:
        """The block nodes nbdsrv made (named ``nbdsrv-…``) still in QEMU."""
        nodes = self.qmp.cmd("query-named-block-nodes", flat=True)
        return [n["node-name"] for n in nodes if n["node-name"].startswith("nbdsrv-")]

    def stop(self) -> None:
        self.qmp.quit()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(self.pidfile.read_text().strip()), signal.SIGKILL)


VM = TypeVar("VM", bound=QemuSystem)


@contextmanager
def running_vm(make: Callable[[Path], VM], prefix: str) -> Iterator[tuple[VM, Path]]:
    """``make(workdir)`` in a new short directory; at the end the VM quits (or is killed when
    its monitor no longer answers) and the directory goes."""
    with short_tmp_dir(prefix) as workdir:
        vm = make(workdir)
        try:
            yield vm, workdir
        finally:
            try:
                vm.stop()
            except Exception:
                vm.kill()
