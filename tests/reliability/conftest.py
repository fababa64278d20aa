"""Fixtures: see tests/vmharness.py."""

from tests.vmharness import vm, workdir

__all__ = ["vm", "workdir"]
