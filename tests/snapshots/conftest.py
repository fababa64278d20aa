"""Fixtures: see tests/harness/qsd.py."""

from tests.harness.qsd import nbdsrv, vm, workdir

__all__ = ["nbdsrv", "vm", "workdir"]
