"""Fixtures for the security tests: certificates, made once per test session."""

from pathlib import Path

import pytest

from .certs import Certs, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(Path(tmp_path_factory.mktemp("certs")))
