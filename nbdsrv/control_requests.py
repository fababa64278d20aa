"""What each control operation accepts (operations.py), checked before any handler runs.

A request is ``{"op": NAME, "args": {...}}``, optionally with ``"version": N`` (one newer
than the daemon's protocol is refused with ``unsupported-version`` before anything else).
Every argument has one JSON type; an optional one may also be null (the CLI sends null for
an option not given). A wrong type, a missing or unknown argument, two arguments that
exclude each other, or a line that is not a JSON object is answered with one sentence — a
handler never sees it, so no ``TypeError`` or traceback comes out of a bad request.
"""

import json
from collections.abc import Mapping
from typing import Any

from .errors import BadRequestError, UnsupportedVersionError
from .operations import BY_NAME, PROTOCOL_VERSION, Operation

# An argument's kind → its Python type and its name in messages. bool is not an int here.
_TYPES: dict[str, tuple[type, str]] = {
    "str": (str, "a string"),
    "path": (str, "a string"),
    "int": (int, "an integer"),
    "bytes": (int, "an integer (bytes)"),
    "bool": (bool, "true or false"),
}


def parse_request(line: bytes) -> tuple[Operation, dict[str, Any]]:
    """(operation, args) of one request line; BadRequestError with one sentence when it is
    malformed."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise BadRequestError("malformed control request: nested too deeply") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise BadRequestError("malformed control request: not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise BadRequestError('malformed control request: expected {"op": NAME, "args": {...}}')
    version = request.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadRequestError("malformed control request: 'version' must be an integer ≥ 1")
    if version > PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"this daemon speaks control protocol version {PROTOCOL_VERSION}; "
            f"the request needs version {version} (upgrade nbdsrv on this host)"
        )
    name = request["op"]
    op = BY_NAME.get(name)
    if op is None:
        raise BadRequestError(f"unknown control operation '{name}'")
    args = request.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequestError(f"control operation '{name}': args must be an object")
    check_arguments(op, args)
    return op, args


def check_arguments(op: Operation, args: Mapping[str, Any]) -> None:
    """Every argument known to ``op``, of its type; required ones present; at most one of
    each exclusive set."""
    known = {arg.name: arg for arg in op.args}
    for name, value in args.items():
        arg = known.get(name)
        if arg is None:
            raise BadRequestError(f"control operation '{op.name}': unknown argument '{name}'")
        python_type, described = _TYPES[arg.kind]
        if value is None and not arg.required:
            continue
        if not isinstance(value, python_type) or (python_type is int and isinstance(value, bool)):
            raise BadRequestError(f"control operation '{op.name}': '{name}' must be {described}")
        if arg.choices and value not in arg.choices:
            raise BadRequestError(
                f"control operation '{op.name}': '{name}' must be one of " + ", ".join(arg.choices)
            )
    given: dict[str, str] = {}
    for arg in op.args:
        value = args.get(arg.name)
        if arg.required and value is None:
            raise BadRequestError(f"control operation '{op.name}': '{arg.name}' is required")
        if arg.exclusive is None or value is None or value is False:
            continue
        if arg.exclusive in given:
            raise BadRequestError(
                f"control operation '{op.name}': '{given[arg.exclusive]}' and '{arg.name}' "
                "exclude each other"
            )
        given[arg.exclusive] = arg.name
