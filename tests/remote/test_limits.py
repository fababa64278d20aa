"""The remote port's limits: a connection that never finishes its handshake or goes idle is
closed, and clients past --max-connections are answered `limit` — the others go on."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from nbdsrv.client import Client, ControlError
from tests.harness.daemon import StartDaemon

from .fleet import FleetCerts, start_host
from .test_refusals import context, tls_connection

TIMEOUT = 30.0


def closed_by_daemon(sock: socket.socket) -> bool:
    """Wait (bounded) for the daemon to close ``sock``; True when it did."""
    sock.settimeout(TIMEOUT)
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def test_silent_and_idle_connections_are_closed_and_extra_clients_refused(
    nbdsrv_daemons: StartDaemon, tmp_path: Path, fleet_certs: FleetCerts
) -> None:
    host = start_host(
        nbdsrv_daemons, tmp_path, fleet_certs, "127.0.0.1", ("web",),
        "--max-connections", "2", "--handshake-timeout", "1", "--idle-timeout", "3",
    )  # fmt: skip
    with socket.create_connection((host.ip, host.remote_port), timeout=TIMEOUT) as silent:
        assert closed_by_daemon(silent)
    with tls_connection(host, context(fleet_certs.backup)) as idle:
        assert closed_by_daemon(idle)
    log = host.daemon.log()
    assert "remote control: refused 127.0.0.1: TLS handshake failed: timed out" in log
    assert "remote control: closed subject=CN=backup,O=nbdsrv tests addr=127.0.0.1: idle" in log

    # Two clients at most past the handshake; a third is told why (the two do not go idle,
    # 3 s, meanwhile).
    with (
        tls_connection(host, context(fleet_certs.backup)) as first,
        tls_connection(host, context(fleet_certs.backup)) as second,
    ):
        for sock in (first, second):
            sock.sendall(b'{"op": "hello"}\n')
            assert json.loads(sock.makefile("rb").readline())["ok"]
        with Client(host.connect, str(fleet_certs.backup)) as third:
            try:
                third.hello()
                raise AssertionError("a third client was served")
            except ControlError as e:
                assert (e.code, str(e)) == ("limit", "too many remote control clients (2)")
    deadline = time.monotonic() + TIMEOUT
    while True:  # the two have gone: a client gets in again
        try:
            with Client(host.connect, str(fleet_certs.backup)) as again:
                assert again.hello()["protocol"] == 1
            break
        except ControlError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
