"""docs/reference.md stays true: it names every command, option and environment variable
that the code has (docs/api.md has its own test for the control operations and codes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbdsrv.operations import OPERATIONS, Operation

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()


def documented(option: str) -> bool:
    return re.search(rf"(?<![\w-]){option}(?![\w-])", REFERENCE) is not None


def options_in_help(*command: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "nbdsrv", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", out)) - {"--help"}


@pytest.mark.parametrize("command", [(), ("daemon",), ("serve",)])
def test_every_option_of_the_command_line_is_documented(command: tuple[str, ...]) -> None:
    missing = sorted(o for o in options_in_help(*command) if not documented(o))
    assert missing == []


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_every_client_command_and_its_options_are_documented(op: Operation) -> None:
    assert f"`nbdsrv {' '.join(op.words)}" in REFERENCE
    flags = [arg.flag for arg in op.args if not arg.positional]
    assert [f for f in flags if not documented(f)] == []


def test_every_environment_variable_the_package_reads_is_documented() -> None:
    read = {
        name
        for module in (ROOT / "nbdsrv").rglob("*.py")
        for name in re.findall(r"environ(?:\.get)?[(\[]\"(\w+)\"", module.read_text())
    }
    assert "NBDSRV_STATE_DIR" in read  # the pattern finds them
    assert sorted(n for n in read if f"`{n}`" not in REFERENCE) == []
