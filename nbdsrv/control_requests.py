"""What each control operation accepts, checked before any handler runs.

A request is ``{"op": NAME, "args": {...}}``. Every argument has one JSON type; an optional
one may also be null (the CLI sends null for an option not given). A wrong type, a missing
or unknown argument, or a line that is not a JSON object is answered with one sentence — a
handler never sees it, so no ``TypeError`` or traceback comes out of a bad request.
"""

import json
from collections.abc import Mapping
from typing import Any

from .errors import ControlError

# JSON type → Python type and its name in messages. bool is not an int here.
_TYPES: dict[str, tuple[type, str]] = {
    "str": (str, "a string"),
    "int": (int, "an integer"),
    "bool": (bool, "true or false"),
}
# op → argument → (type, required)
ARGUMENTS: dict[str, dict[str, tuple[str, bool]]] = {
    "status": {},
    "checkpoint-create": {
        "vm": ("str", True),
        "name": ("str", False),
        "granularity": ("int", False),
        "quiesce": ("bool", False),
    },
    "checkpoint-list": {"vm": ("str", True)},
    "checkpoint-delete": {"vm": ("str", True), "name": ("str", True)},
    "backup-begin": {
        "vm": ("str", True),
        "from": ("str", False),
        "checkpoint": ("str", False),
        "no_checkpoint": ("bool", False),
        "all_checkpoints": ("bool", False),
        "bitmap_name": ("str", False),
        "quiesce": ("bool", False),
    },
    "backup-list": {"vm": ("str", True)},
    "backup-end": {"vm": ("str", True), "id": ("str", True)},
    "snapshot-create": {"vm": ("str", True), "dir": ("str", False)},
    "snapshot-commit": {"vm": ("str", True)},
}


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """(op, args) of one request line; ControlError with one sentence when it is malformed."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise ControlError("malformed control request: nested too deeply") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise ControlError("malformed control request: not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ControlError('malformed control request: expected {"op": NAME, "args": {...}}')
    op = request["op"]
    args = request.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ControlError(f"control operation '{op}': args must be an object")
    check_arguments(op, args)
    return op, args


def check_arguments(op: str, args: Mapping[str, Any]) -> None:
    """Every argument known for ``op``, of its type; required ones present. Operations
    without an entry in ARGUMENTS are checked by their handler."""
    schema = ARGUMENTS.get(op)
    if schema is None:
        return
    for name, value in args.items():
        if name not in schema:
            raise ControlError(f"control operation '{op}': unknown argument '{name}'")
        kind, required = schema[name]
        python_type, described = _TYPES[kind]
        if value is None and not required:
            continue
        if not isinstance(value, python_type) or (kind == "int" and isinstance(value, bool)):
            raise ControlError(f"control operation '{op}': '{name}' must be {described}")
    for name, (_, required) in schema.items():
        if required and args.get(name) is None:
            raise ControlError(f"control operation '{op}': '{name}' is required")
