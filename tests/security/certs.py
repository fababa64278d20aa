"""Test certificates made with openssl: one CA for the deployment, one a stranger's.

Directory layout is what libnbd (``nbds://…?tls-certificates=DIR``) and QEMU's
``tls-creds-x509,dir=DIR,endpoint=client`` read: ``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``. The server's files are ``server/{ca-cert,server-cert,server-key}.pem``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.harness.tools import require_tool, run

SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""
CLIENT_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Certs:
    server: Path  # ca-cert.pem, server-cert.pem, server-key.pem
    backup: Path  # client CN=backup, O=nbdsrv tests, signed by the CA; trusts the CA
    reader: Path  # client CN=reader, signed by the CA; trusts the CA
    no_client_cert: Path  # trusts the CA, has no certificate of its own
    stranger: Path  # trusts the CA; its client certificate is signed by another CA
    wrong_ca: Path  # trusts only the other CA (so not the server); CN=backup from the CA

    @property
    def server_args(self) -> list[str]:
        return [
            "--tls-cert",
            str(self.server / "server-cert.pem"),
            "--tls-key",
            str(self.server / "server-key.pem"),
        ]

    @property
    def server_args_with_ca(self) -> list[str]:
        return [*self.server_args, "--tls-ca", str(self.server / "ca-cert.pem")]


def _ca(openssl: str, path: Path, name: str) -> None:
    run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", str(path / f"{name}-key.pem"), "-out", str(path / f"{name}-cert.pem"),
            "-subj", f"/O=nbdsrv tests/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )  # fmt: skip


def _leaf(openssl: str, tmp: Path, ca: str, subject: str, ext: str, cert: Path, key: Path) -> None:
    csr, extfile = tmp / "leaf.csr", tmp / "leaf.ext"
    extfile.write_text(ext)
    run(
        [
            openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", subject,
        ]
    )  # fmt: skip
    run(
        [
            openssl, "x509", "-req", "-in", str(csr), "-days", "3650", "-set_serial",
            str(abs(hash((subject, str(cert)))) % (1 << 60)),
            "-CA", str(tmp / f"{ca}-cert.pem"), "-CAkey", str(tmp / f"{ca}-key.pem"),
            "-out", str(cert), "-extfile", str(extfile),
        ]
    )  # fmt: skip


def make_certs(root: Path) -> Certs:
    openssl = require_tool("openssl")
    root.mkdir(parents=True, exist_ok=True)
    _ca(openssl, root, "ca")
    _ca(openssl, root, "other-ca")
    ca_cert = (root / "ca-cert.pem").read_text()
    other_cert = (root / "other-ca-cert.pem").read_text()
    dirs = {}
    for name in ("server", "backup", "reader", "no-client-cert", "stranger", "wrong-ca"):
        dirs[name] = root / name
        dirs[name].mkdir()
        trusted = other_cert if name == "wrong-ca" else ca_cert
        (dirs[name] / "ca-cert.pem").write_text(trusted)
    server = dirs["server"]
    _leaf(openssl, root, "ca", "/O=nbdsrv tests/CN=localhost", SERVER_EXT,
          server / "server-cert.pem", server / "server-key.pem")  # fmt: skip
    for name, ca, subject in (
        ("backup", "ca", "/O=nbdsrv tests/CN=backup"),
        ("reader", "ca", "/O=nbdsrv tests/CN=reader"),
        ("stranger", "other-ca", "/O=nbdsrv tests/CN=backup"),
        ("wrong-ca", "ca", "/O=nbdsrv tests/CN=backup"),
    ):
        d = dirs[name]
        _leaf(openssl, root, ca, subject, CLIENT_EXT, d / "client-cert.pem", d / "client-key.pem")
    return Certs(
        server=server,
        backup=dirs["backup"],
        reader=dirs["reader"],
        no_client_cert=dirs["no-client-cert"],
        stranger=dirs["stranger"],
        wrong_ca=dirs["wrong-ca"],
    )
