"""Fixtures of the remote control tests: certificates once per session, two hosts per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.daemon import StartDaemon

from .fleet import FleetCerts, Host, make_fleet_certs, start_host

IPS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture(scope="session")
def fleet_certs(tmp_path_factory: pytest.TempPathFactory) -> FleetCerts:
    return make_fleet_certs(Path(tmp_path_factory.mktemp("fleet-certs")), IPS)


@pytest.fixture
def hosts(
    nbdsrv_daemons: StartDaemon, tmp_path: Path, fleet_certs: FleetCerts
) -> tuple[Host, Host]:
    """host1 (127.0.0.1) runs VMs web and secret; host2 (127.0.0.2) runs mail."""
    host1 = start_host(nbdsrv_daemons, tmp_path, fleet_certs, IPS[0], ("web", "secret"))
    host2 = start_host(nbdsrv_daemons, tmp_path, fleet_certs, IPS[1], ("mail",))
    return host1, host2


@pytest.fixture
def host(nbdsrv_daemons: StartDaemon, tmp_path: Path, fleet_certs: FleetCerts) -> Host:
    """One host (127.0.0.1) with VMs web (granted to CN=backup) and secret (CN=reader)."""
    return start_host(nbdsrv_daemons, tmp_path, fleet_certs, IPS[0], ("web", "secret"))
