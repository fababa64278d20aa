"""A daemon serving the test images on TCP and a unix socket with extra security options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ImageFile, StartDaemon
from tests.tools import DaemonProcess


@dataclass
class Secured:
    daemon: DaemonProcess
    images: dict[str, ImageFile]
    unix_socket: str
    port: int
    status: dict[str, Any]

    def uri(self, export: str = "", certs: Path | None = None) -> str:
        """``nbds://`` with client certificates from ``certs``, else ``nbd://``."""
        if certs is None:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbds://localhost:{self.port}/{export}?tls-certificates={certs}"

    def unix_uri(self, export: str = "", certs: Path | None = None) -> str:
        if certs is None:
            return f"nbd+unix:///{export}?socket={self.unix_socket}"
        return (
            f"nbds+unix:///{export}?socket={self.unix_socket}&tls-certificates={certs}"
            "&tls-hostname=localhost"
        )

    def vm_rss_kib(self) -> int:
        """The daemon's resident memory (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")


def start_secured(
    start: StartDaemon, images: dict[str, ImageFile], short_dir: Path, *args: str
) -> Secured:
    unix_socket = str(short_dir / "nbd.sock")
    argv = ["--listen", f"unix:{unix_socket}", "--listen", "tcp:127.0.0.1:0", *args]
    for image in images.values():
        argv += ["--file", f"{image.name}={image.path}"]
    daemon = start(*argv)
    status = daemon.status()
    tcp = [a for a in status["listen"] if a.startswith("tcp:")]
    port = int(tcp[0].rpartition(":")[2])
    return Secured(daemon, images, unix_socket, port, status)
