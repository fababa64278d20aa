"""Tuning values read from ``NBDSRV_*`` environment variables (docs/reference.md)."""

import os


def seconds_from_environment(name: str, default: float, minimum: float = 0.05) -> float:
    """``$name`` as seconds, at least ``minimum``; ``default`` when unset or not a number."""
    try:
        return max(minimum, float(os.environ.get(name, default)))
    except ValueError:
        return default
