"""Hostile and mistaken remote clients: each gets one clear refusal, nothing changes on the
host, and a backup server's connection opened before goes on working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.client import Client, ControlError
from tests.harness.daemon import nbdsrv_argv
from tests.harness.tools import run_result

from .fleet import FleetCerts, Host, remote_cli, remote_error


def context(certs: Path, with_certificate: bool = True) -> ssl.SSLContext:
    tls = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    if with_certificate:
        tls.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    return tls


@contextmanager
def tls_connection(host: Host, tls: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection((host.ip, host.remote_port), timeout=30)
    with tls.wrap_socket(raw, server_hostname=host.ip) as sock:
        yield sock


def ask(sock: socket.socket, request: bytes) -> dict[str, Any]:
    sock.sendall(request)
    line = sock.makefile("rb").readline()
    answer: dict[str, Any] = json.loads(line)
    return answer


@pytest.fixture
def unaffected(host: Host, fleet_certs: FleetCerts) -> Iterator[Client]:
    """A backup server's connection, open before the refusal and checked after it; and the
    host checked unchanged (web's checkpoints, no session)."""
    with Client(host.connect, str(fleet_certs.backup)) as client:
        before = client.checkpoint_list("web")
        yield client
        assert client.hello()["protocol"] == 1  # the same connection still works
        assert client.checkpoint_list("web") == before
        assert client.backup_list("web") == []


def test_a_client_without_certificate_is_refused_at_the_handshake(
    host: Host, fleet_certs: FleetCerts, unaffected: Client
) -> None:
    no_certificate = context(fleet_certs.no_client_cert, False)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        tls_connection(host, no_certificate) as sock,
    ):
        # TLS 1.3: the client's side of the handshake ends first; the alert comes next.
        ask(sock, b'{"op": "backup-begin", "args": {"vm": "web"}}\n')
    error = remote_error(host, fleet_certs.no_client_cert, "status")
    assert error == f"no client-cert.pem in {fleet_certs.no_client_cert} (--tls-certificates)"
    assert "TLS handshake failed: " in host.daemon.log()


@pytest.mark.parametrize("who", ["stranger", "expired"])
def test_a_certificate_of_another_ca_or_expired_is_refused(
    host: Host, fleet_certs: FleetCerts, unaffected: Client, who: str
) -> None:
    certs = getattr(fleet_certs, who)
    error = remote_error(host, certs, "backup", "begin", "web")
    assert error.startswith(f"the daemon at {host.connect} refused the TLS connection ("), error
    reason = {
        "stranger": "unable to get local issuer certificate",
        "expired": "certificate has expired",
    }[who]
    assert f"TLS handshake failed: client certificate refused: {reason}" in host.daemon.log()


def test_a_certificate_sees_and_touches_only_its_vms(
    host: Host, fleet_certs: FleetCerts, unaffected: Client
) -> None:
    # A session of web, so that there is something of web for status to hide.
    session = host.daemon.json("backup", "begin", "web", "--no-checkpoint")
    try:
        status = remote_cli(host, fleet_certs.reader, "status")
        assert [vm["name"] for vm in status["vms"]] == ["secret"]
        assert status["sessions"] == [] and status["exports"] == []
        assert "connections" not in status
        for words in (
            ("checkpoint", "create", "{vm}"),
            ("checkpoint", "list", "{vm}"),
            ("checkpoint", "delete", "{vm}", "c1"),
            ("backup", "begin", "{vm}"),
            ("backup", "list", "{vm}"),
            ("backup", "end", "{vm}", session["id"]),
            ("snapshot", "create", "{vm}"),
            ("snapshot", "commit", "{vm}"),
        ):
            hidden = remote_error(host, fleet_certs.reader, *(w.format(vm="web") for w in words))
            unknown = remote_error(
                host, fleet_certs.reader, *(w.format(vm="nosuch") for w in words)
            )
            # Exactly what a VM that does not exist gets: the client learns no names.
            assert hidden == unknown.replace("nosuch", "web") == "no VM named 'web'", words
        assert [s["id"] for s in unaffected.backup_list("web")] == [session["id"]]
    finally:
        host.daemon.json("backup", "end", "web", session["id"])
    # The reader's own VM: every operation, but no host path.
    assert remote_cli(host, fleet_certs.reader, "checkpoint", "list", "secret") == []
    error = remote_error(host, fleet_certs.reader, "snapshot", "create", "secret", "--dir", "/tmp")
    assert (
        error == "'snapshot-create': 'dir' is for local clients only (a path on the daemon's host)"
    )
    log = host.daemon.log()
    assert "refused checkpoint-list vm=web by subject=CN=reader,O=nbdsrv tests" in log


def test_plain_text_to_the_tls_port_gets_one_plain_answer(host: Host, unaffected: Client) -> None:
    with socket.create_connection((host.ip, host.remote_port), timeout=30) as sock:
        answer = ask(sock, b'{"op": "backup-begin", "args": {"vm": "web"}}\n')
        assert answer["error"]["code"] == "bad-request"
        assert answer["error"]["message"].startswith("this port speaks TLS only")
        assert sock.recv(1) == b""  # and closed
    assert "remote control: refused 127.0.0.1: not TLS" in host.daemon.log()


def test_garbage_after_the_handshake_is_answered_and_the_connection_goes_on(
    host: Host, fleet_certs: FleetCerts, unaffected: Client
) -> None:
    with tls_connection(host, context(fleet_certs.backup)) as sock:
        for garbage in (b"\x00\xff\xfe garbage\n", b"[1, 2]\n", b'{"op": 7}\n', b"{" * 100 + b"\n"):
            answer = ask(sock, garbage)
            assert answer["ok"] is False and answer["error"]["code"] == "bad-request", garbage
        answer = ask(sock, b'{"op": "hello", "version": 99}\n')
        assert answer["error"]["code"] == "unsupported-version"
        assert ask(sock, b'{"op": "hello"}\n')["result"]["protocol"] == 1


def test_a_20_mb_request_line_is_refused(
    host: Host, fleet_certs: FleetCerts, unaffected: Client
) -> None:
    line = b'{"op": "checkpoint-create", "args": {"vm": "web", "name": "' + b"x" * (20 << 20)

    async def refused() -> bytes:
        # asyncio's TLS reads while it writes, in one thread (an ssl.SSLSocket must not be
        # read and written by two threads at once).
        tls = context(fleet_certs.backup)
        reader, writer = await asyncio.open_connection(
            host.ip, host.remote_port, ssl=tls, server_hostname=host.ip
        )

        async def send() -> None:
            # The daemon may close the connection before the end: its answer came first.
            with contextlib.suppress(OSError):
                writer.write(line + b'"}}\n')
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            return await asyncio.wait_for(reader.readline(), 60)
        finally:
            sender.cancel()
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    answer = json.loads(asyncio.run(refused()))
    assert answer["error"] == {
        "code": "limit",
        "message": "request line longer than 1048576 bytes",
    }
    assert unaffected.status()["vms"][0]["name"] == "web"


def test_500_idle_connections_keep_no_client_out(
    host: Host, fleet_certs: FleetCerts, unaffected: Client
) -> None:
    idle = [socket.create_connection((host.ip, host.remote_port), timeout=30) for _ in range(500)]
    try:
        # A new backup server still gets in, and so does a local client.
        assert [vm["name"] for vm in remote_cli(host, fleet_certs.backup, "status")["vms"]] == [
            "web"
        ]
        assert host.daemon.status()["remote"]
    finally:
        for sock in idle:
            sock.close()
    assert "in the TLS handshake (128 connections in it)" in host.daemon.log()


def test_remote_needs_the_tls_files_and_subject_rules(tmp_path: Path) -> None:
    base = ["daemon", "--state-dir", str(tmp_path / "s"), "--control", str(tmp_path / "c")]
    for extra, message in (
        (
            ["--remote", "tcp:127.0.0.1:0"],
            "--remote needs --tls-cert, --tls-key and --tls-ca (remote clients must present a "
            "certificate the CA signed): --tls-cert, --tls-key, --tls-ca missing",
        ),
        (["--remote-allow", "a=subject:CN=x"], "--remote-allow needs --remote tcp:HOST:PORT"),
    ):
        result = run_result(nbdsrv_argv(*base, *extra), timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip() == f"nbdsrv: error: {message}"


def test_an_address_rule_is_not_a_grant(fleet_certs: FleetCerts, tmp_path: Path) -> None:
    server = fleet_certs.server("127.0.0.1")
    argv = nbdsrv_argv(
        "daemon", "--state-dir", str(tmp_path / "s"), "--control", str(tmp_path / "c"),
        "--tls-cert", str(server / "server-cert.pem"), "--tls-key", str(server / "server-key.pem"),
        "--tls-ca", str(server / "ca-cert.pem"), "--remote", "tcp:127.0.0.1:0",
        "--remote-allow", "web=cidr:10.0.0.0/8",
    )  # fmt: skip
    result = run_result(argv, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "nbdsrv: error: bad --remote-allow 'web=cidr:10.0.0.0/8': use "
        "VM-PATTERN=subject:CN=NAME[,...]"
    )


def test_the_library_raises_the_daemons_code(host: Host, fleet_certs: FleetCerts) -> None:
    with Client(host.connect, str(fleet_certs.reader)) as client, pytest.raises(ControlError) as e:
        client.backup_begin("web")
    raised = e
    assert raised.value.code == "not-found" and str(raised.value) == "no VM named 'web'"
