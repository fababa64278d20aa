"""Polling for a condition a test cannot be told about, within a generous guard."""

import time
from collections.abc import Callable

import pytest

# Generous for a loaded 2-core machine; a test never asserts how long it took.
GUARD = 30.0


def wait_for(predicate: Callable[[], object], what: str, timeout: float = GUARD) -> None:
    """Poll ``predicate`` every 50 ms until it is true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}", pytrace=False)
        time.sleep(0.05)
