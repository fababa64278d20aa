"""A daemon serving the test images (tests/harness/images.py) on a unix socket and TCP, with
any extra options (TLS, access rules, limits), and the URIs a client opens them by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.daemon import DaemonProcess, StartDaemon
from tests.harness.images import ImageFile


@dataclass
class Served:
    """A running daemon serving ``images`` on ``unix_socket`` and TCP ``tcp_port``."""

    daemon: DaemonProcess
    images: dict[str, ImageFile]
    unix_socket: str
    tcp_port: int
    status: dict[str, Any]

    @property
    def control(self) -> str:
        return self.daemon.control

    def tcp_uri(self, export: str = "", certs: Path | None = None) -> str:
        """``nbds://`` with client certificates from ``certs``, else ``nbd://``."""
        if certs is None:
            return f"nbd://127.0.0.1:{self.tcp_port}/{export}"
        return f"nbds://localhost:{self.tcp_port}/{export}?tls-certificates={certs}"

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


def serve_images(
    start: StartDaemon, images: dict[str, ImageFile], short_dir: Path, *args: str
) -> Served:
    """``start`` (the ``nbdsrv_daemons`` fixture) a daemon serving ``images`` on
    ``short_dir/nbd.sock`` and an ephemeral TCP port, with ``args`` added."""
    unix_socket = str(short_dir / "nbd.sock")
    argv = ["--listen", f"unix:{unix_socket}", "--listen", "tcp:127.0.0.1:0", *args]
    for image in images.values():
        argv += ["--file", f"{image.name}={image.path}"]
    daemon = start(*argv)
    status = daemon.status()
    tcp = [a for a in status["listen"] if a.startswith("tcp:")]
    assert len(tcp) == 1, status["listen"]
    port = int(tcp[0].rpartition(":")[2])
    assert port != 0, status["listen"]
    return Served(daemon, images, unix_socket, port, status)
