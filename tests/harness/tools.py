"""Helpers for tests that drive real programs.

- :func:`require_tool` — the path of a tool; a missing tool fails in CI
  (``NBDSRV_REQUIRE_TOOLS=1``) and skips elsewhere.
- :func:`run` — run a command with a timeout; a failure shows the command, status and stderr.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

import pytest

# Generous for a loaded 2-core machine, far below a test's budget.
TIMEOUT = 30.0

# Debian's python3-libnbd is built for /usr/bin/python3; nbdsh runs the first python3 on PATH.
SYSTEM_PATH_FIRST = {"PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def require_tool(name: str) -> str:
    """Path of the program ``name``. Missing: fail under NBDSRV_REQUIRE_TOOLS=1, else skip."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("NBDSRV_REQUIRE_TOOLS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def _describe(argv: Sequence[str], result: subprocess.CompletedProcess[str] | None) -> str:
    text = f"command: {shlex.join(argv)}"
    if result is not None:
        text += f"\nexit status: {result.returncode}"
        if result.stdout:
            text += f"\nstdout:\n{result.stdout.rstrip()}"
        text += f"\nstderr:\n{result.stderr.rstrip() or '(empty)'}"
    return text


def run_result(
    argv: Sequence[str],
    *,
    timeout: float = TIMEOUT,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (text mode, stdout and stderr captured) and return whatever happened.
    ``env`` entries are added to the current environment. A timeout fails the test."""
    full_env = {**os.environ, **env} if env is not None else None
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(
            f"timed out after {timeout:g} s\n{_describe(argv, None)}\nstderr:\n{stderr or ''}",
            pytrace=False,
        )


def run(
    argv: Sequence[str],
    *,
    timeout: float = TIMEOUT,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> str:
    """Run ``argv``, require exit status 0 and return its stdout."""
    result = run_result(argv, timeout=timeout, env=env, input=input)
    if result.returncode != 0:
        pytest.fail(f"command failed\n{_describe(argv, result)}", pytrace=False)
    return result.stdout


def run_fails(
    argv: Sequence[str],
    *,
    timeout: float = TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, require a non-zero exit status and return the result."""
    result = run_result(argv, timeout=timeout, env=env)
    if result.returncode == 0:
        pytest.fail(f"command succeeded but should have failed\n{_describe(argv, result)}")
    return result
