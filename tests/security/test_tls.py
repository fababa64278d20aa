"""STARTTLS with X.509 against real clients: libnbd (nbdinfo, nbdcopy) and QEMU (qemu-img,
qemu-io); refused: a client that does not trust the server, a client without a certificate
or with one from another CA when the daemon has --tls-ca, and plain text under require."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.checksums import file_sha256 as sha256
from tests.harness.daemon import StartDaemon, nbdsrv_argv
from tests.harness.images import ImageFile
from tests.harness.served import Served, serve_images
from tests.harness.tools import require_tool, run, run_fails

from .certs import Certs


@pytest.fixture
def tls_ca(
    nbdsrv_daemons: StartDaemon,
    test_images: dict[str, ImageFile],
    short_dir: Path,
    certs: Certs,
) -> Served:
    """TLS required, client certificates required and verified against the CA."""
    return serve_images(nbdsrv_daemons, test_images, short_dir, *certs.server_args_with_ca)


def qemu_tls(certs_dir: Path, port: int, export: str) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={certs_dir},endpoint=client",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
        f"export={export},tls-creds=tls0",
    ]


def test_nbdinfo_negotiates_tls_with_a_client_certificate(tls_ca: Served, certs: Certs) -> None:
    info = json.loads(
        run([require_tool("nbdinfo"), "--json", tls_ca.tcp_uri("sparse", certs.backup)])
    )
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == tls_ca.images["sparse"].size


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_nbdcopy_over_tls_copies_the_export_exactly(
    tls_ca: Served, certs: Certs, tmp_path: Path, transport: str
) -> None:
    uri = (tls_ca.tcp_uri if transport == "tcp" else tls_ca.unix_uri)("sparse", certs.backup)
    target = tmp_path / "copy.raw"
    run([require_tool("nbdcopy"), "--connections=2", uri, str(target)])
    assert sha256(target) == tls_ca.images["sparse"].sha256()


def test_qemu_img_convert_over_tls_copies_the_export_exactly(
    tls_ca: Served, certs: Certs, tmp_path: Path
) -> None:
    target = tmp_path / "copy.raw"
    argv = [require_tool("qemu-img"), "convert", "-O", "raw"]
    run([*argv, *qemu_tls(certs.backup, tls_ca.tcp_port, "sparse"), str(target)])
    assert sha256(target) == tls_ca.images["sparse"].sha256()


def test_qemu_io_reads_patterns_over_tls(tls_ca: Served, certs: Certs) -> None:
    image = tls_ca.images["sparse"]
    commands = []
    for offset, length, byte in image.patterns:
        commands += ["-c", f"read -P 0x{byte:02x} {offset} {length}"]
    out = run([require_tool("qemu-io"), "-r", *qemu_tls(certs.backup, tls_ca.tcp_port, "sparse"),
               *commands])  # fmt: skip
    assert out.count("read ") == len(image.patterns), out


def test_audit_line_names_the_verified_subject(tls_ca: Served, certs: Certs) -> None:
    run([require_tool("nbdinfo"), tls_ca.tcp_uri("odd", certs.backup)])
    tls_ca.daemon.stop()
    lines = [line for line in tls_ca.daemon.log().splitlines() if "nbdsrv.audit" in line]
    closed = [line for line in lines if "connection closed" in line and "export=odd" in line]
    assert closed, lines
    assert 'tls=yes subject="CN=backup,O=nbdsrv tests"' in closed[0]
    assert "bytes=" in closed[0] and "duration=" in closed[0]


@pytest.mark.parametrize(
    ("client", "why"),
    [
        ("no_client_cert", "no client certificate"),
        ("stranger", "client certificate from another CA"),
        ("wrong_ca", "client does not trust the server's CA"),
    ],
)
def test_tls_handshake_is_refused(tls_ca: Served, certs: Certs, client: str, why: str) -> None:
    client_dir: Path = getattr(certs, client)
    run_fails([require_tool("nbdinfo"), tls_ca.tcp_uri("sparse", client_dir)])
    run_fails([require_tool("qemu-img"), "info", *qemu_tls(client_dir, tls_ca.tcp_port, "sparse")])
    # ... and the daemon goes on serving a good client.
    run([require_tool("nbdinfo"), tls_ca.tcp_uri("sparse", certs.backup)])
    if client != "wrong_ca":  # that one is refused by the client, before the server knows
        assert "TLS handshake failed" in tls_ca.daemon.log(), why


def test_plain_text_is_refused_under_require(tls_ca: Served) -> None:
    result = run_fails([require_tool("qemu-img"), "info", tls_ca.tcp_uri("sparse")])
    assert "TLS" in result.stderr
    run_fails([require_tool("nbdinfo"), tls_ca.tcp_uri("sparse")])
    run_fails([require_tool("nbdinfo"), "--list", tls_ca.tcp_uri()])


def test_tls_on_serves_plain_and_tls_clients(
    nbdsrv_daemons: StartDaemon,
    test_images: dict[str, ImageFile],
    short_dir: Path,
    certs: Certs,
) -> None:
    served = serve_images(nbdsrv_daemons, test_images, short_dir, *certs.server_args, "--tls", "on")
    plain = json.loads(run([require_tool("nbdinfo"), "--json", served.tcp_uri("odd")]))
    assert plain["TLS"] is False
    # No --tls-ca: the server asks for no client certificate.
    secure = json.loads(run([require_tool("nbdinfo"), "--json",
                             served.tcp_uri("odd", certs.no_client_cert)]))  # fmt: skip
    assert secure["TLS"] is True


def test_default_without_tls_refuses_starttls(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path, certs: Certs
) -> None:
    served = serve_images(nbdsrv_daemons, test_images, short_dir)
    run_fails([require_tool("nbdinfo"), served.tcp_uri("odd", certs.backup)])
    run([require_tool("nbdinfo"), served.tcp_uri("odd")])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls", "require"], "--tls require needs --tls-cert"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "cannot read"),
        (["--allow", "x=subject:CN=a"], "needs --tls-ca"),
        (["--allow", "x=cidr:300.1.1.1"], "not an address or network"),
        (["--allow", "x"], "bad --allow"),
        (["--max-connections", "-1"], "must not be negative"),
    ],
)
def test_bad_security_options_are_one_clear_error(
    short_dir: Path, args: list[str], message: str
) -> None:
    control = str(short_dir / "c.sock")
    argv = nbdsrv_argv("daemon", "--state-dir", str(short_dir / "s"), "--control", control)
    result = run_fails([*argv, "--listen", f"unix:{short_dir}/n.sock", *args])
    assert result.returncode == 1
    assert result.stderr.startswith("nbdsrv: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
