"""Two "hosts" for the remote control tests: two daemons on two loopback addresses, each with
its own state, server certificate and embedded VMs, and the client certificates of a backup
server (and of strangers) in the layout libnbd and QEMU read (``ca-cert.pem``,
``client-cert.pem``, ``client-key.pem``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.daemon import DaemonProcess, StartDaemon, error_line, nbdsrv_argv
from tests.harness.tools import require_tool, run, run_result
from tests.security.certs import CLIENT_EXT, _ca, _leaf

MiB = 1024 * 1024
DISK_SIZE = 16 * MiB


@dataclass(frozen=True)
class FleetCerts:
    root: Path
    backup: Path  # CN=backup, signed by the CA: granted web and mail
    reader: Path  # CN=reader, signed by the CA: granted secret only
    stranger: Path  # CN=backup, signed by another CA
    expired: Path  # CN=backup, signed by the CA, expired yesterday
    no_client_cert: Path  # trusts the CA, has no certificate of its own

    def server(self, ip: str) -> Path:
        return self.root / f"server-{ip}"


def make_fleet_certs(root: Path, ips: tuple[str, ...]) -> FleetCerts:
    openssl = require_tool("openssl")
    root.mkdir(parents=True, exist_ok=True)
    _ca(openssl, root, "ca")
    _ca(openssl, root, "other-ca")
    ca = (root / "ca-cert.pem").read_text()
    for ip in ips:  # one server certificate per host, naming its address
        d = root / f"server-{ip}"
        d.mkdir()
        (d / "ca-cert.pem").write_text(ca)
        ext = (
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            f"extendedKeyUsage = serverAuth\nsubjectAltName = IP:{ip}\n"
        )
        _leaf(openssl, root, "ca", f"/O=nbdsrv tests/CN={ip}", ext,
              d / "server-cert.pem", d / "server-key.pem")  # fmt: skip
    dirs = {}
    for name, issuer, cn in (
        ("backup", "ca", "backup"),
        ("reader", "ca", "reader"),
        ("stranger", "other-ca", "backup"),
    ):
        d = dirs[name] = root / name
        d.mkdir()
        (d / "ca-cert.pem").write_text(ca)
        _leaf(openssl, root, issuer, f"/O=nbdsrv tests/CN={cn}", CLIENT_EXT,
              d / "client-cert.pem", d / "client-key.pem")  # fmt: skip
    d = dirs["expired"] = root / "expired"
    d.mkdir()
    (d / "ca-cert.pem").write_text(ca)
    (root / "expired.ext").write_text(CLIENT_EXT)
    run([openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
         str(d / "client-key.pem"), "-out", str(root / "expired.csr"),
         "-subj", "/O=nbdsrv tests/CN=backup"])  # fmt: skip
    run([openssl, "x509", "-req", "-in", str(root / "expired.csr"), "-days", "-1",
         "-CA", str(root / "ca-cert.pem"), "-CAkey", str(root / "ca-key.pem"),
         "-out", str(d / "client-cert.pem"), "-extfile", str(root / "expired.ext")])  # fmt: skip
    d = dirs["no-client-cert"] = root / "no-client-cert"
    d.mkdir()
    (d / "ca-cert.pem").write_text(ca)
    # dirs holds one directory per field: backup, reader, stranger, expired, no-client-cert.
    return FleetCerts(root=root, **{name.replace("-", "_"): d for name, d in dirs.items()})


@dataclass
class Host:
    """A daemon standing for one hypervisor host."""

    ip: str
    daemon: DaemonProcess
    images: dict[str, Path]
    remote_port: int
    nbd_port: int
    # What each VM's disk0 must hold, from the writes the test made on purpose.
    model: dict[str, bytearray] = field(default_factory=dict, repr=False)

    @property
    def connect(self) -> str:
        return f"nbdsrv+tls://{self.ip}:{self.remote_port}"

    def write(self, vm: str, pattern: int, offset: int, length: int = 64 * 1024) -> None:
        """Write to the VM's live disk, as its guest would."""
        live = f"nbd+unix:///disk0?socket={self.daemon.state_dir}/{vm}.live.sock"
        run([require_tool("qemu-io"), "-f", "raw", "-c",
             f"write -P {pattern} {offset} {length}", live])  # fmt: skip
        self.model.setdefault(vm, bytearray(DISK_SIZE))[offset : offset + length] = (
            bytes([pattern]) * length
        )


def start_host(
    start: StartDaemon,
    workdir: Path,
    certs: FleetCerts,
    ip: str,
    vms: tuple[str, ...],
    *extra: str,
) -> Host:
    images = {}
    for vm in vms:
        images[vm] = workdir / f"{ip}-{vm}.qcow2"
        run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(images[vm]),
             str(DISK_SIZE)])  # fmt: skip
    server = certs.server(ip)
    args = [
        "--listen", f"tcp:{ip}:0",
        "--tls-cert", str(server / "server-cert.pem"),
        "--tls-key", str(server / "server-key.pem"),
        "--tls-ca", str(server / "ca-cert.pem"),
        "--remote", f"tcp:{ip}:0",
        "--remote-allow", "web=subject:CN=backup",
        "--remote-allow", "mail=subject:O=nbdsrv tests,CN=backup",
        "--remote-allow", "sec*=subject:CN=reader",
    ]  # fmt: skip
    for vm, image in images.items():
        args += ["--image", f"{vm}={image}"]
    daemon = start(*args, *extra, name=f"host-{ip}")
    status = daemon.status()
    remote_port = int(status["remote"][0].rpartition(":")[2])
    nbd_port = int(status["listen"][0].rpartition(":")[2])
    host = Host(ip, daemon, images, remote_port, nbd_port)
    for vm in vms:
        host.model[vm] = bytearray(DISK_SIZE)
    return host


def remote_cli(host: Host, certs: Path, *args: str) -> Any:
    """``nbdsrv ARGS --json --connect … --tls-certificates CERTS`` (must succeed)."""
    argv = nbdsrv_argv(*args, "--json", "--connect", host.connect, "--tls-certificates", str(certs))
    return json.loads(run(argv, timeout=60))


def remote_error(host: Host, certs: Path, *args: str) -> str:
    """The one error line of a remote command that must fail."""
    argv = nbdsrv_argv(*args, "--connect", host.connect, "--tls-certificates", str(certs))
    return error_line(run_result(argv, timeout=60))
