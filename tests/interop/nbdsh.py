"""Run a libnbd Python snippet in ``nbdsh`` and get its results back as JSON.

libnbd's Python module is built for Debian's /usr/bin/python3, so the snippet runs in a
subprocess (which also bounds it with a timeout). The snippet gets ``h`` (a fresh handle),
``nbd``, ``out`` (a dict it fills; printed as JSON at the end) and ``error_of(f, *args)``
(``None``, or ``{"errno": "EINVAL", "message": …}`` if the call raised ``nbd.Error``).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from tests.harness.tools import SYSTEM_PATH_FIRST, require_tool, run

PRELUDE = """
import json

out = {}


def error_of(f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except nbd.Error as e:
        return {"errno": e.errno, "message": e.string}
    return None


"""
EPILOGUE = "\nprint(json.dumps(out))\n"


def nbdsh(snippet: str, **values: Any) -> dict[str, Any]:
    """Run ``snippet`` with each keyword argument bound to a global of that name."""
    program = require_tool("nbdsh")
    bindings = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    script = PRELUDE + bindings + textwrap.dedent(snippet) + EPILOGUE
    stdout = run([program, "-c", script], env=SYSTEM_PATH_FIRST)
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result
