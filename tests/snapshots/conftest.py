"""Fixtures: see tests/vmharness.py."""

from tests.vmharness import nbdsrv, vm, workdir

__all__ = ["nbdsrv", "vm", "workdir"]
