"""JSON for the client commands, from the C half of the json package (``_json``) alone.

``import json`` is a third of a client command's start-up here (~20 ms of ~55 for ``nbdsrv
status``): json.decoder and json.encoder compile regular expressions when imported (so ``re``,
and ``enum`` under it, load and run), for nothing a client uses — CPython's C scanner and
encoder do all the work. The text is json.dumps' to the byte (``", "`` and ``": "``, ASCII
escapes; :func:`dumps_indented` as ``indent=2``), and :func:`loads` gives json.loads' values.
Only a malformed document imports json.decoder, for its error.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see cli.py)
if TYPE_CHECKING:
    from typing import Any

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Decoding:
    """What ``_json.make_scanner`` reads from a json.JSONDecoder, as json.loads sets it."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


def _unknown(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# typeshed wants a JSONDecoder; the scanner reads only the attributes above.
_scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]
_encode = _json.make_encoder(
    None, _unknown, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
)
_WHITESPACE = " \t\n\r"


def loads(text: str | bytes) -> Any:
    """The value of one JSON document (json.loads)."""
    if isinstance(text, bytes):
        text = text.decode()
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as e:
        _fail("Expecting value", text, e.value)
    extra = text[end:].lstrip(_WHITESPACE)
    if extra:
        _fail("Extra data", text, len(text) - len(extra))
    return value


def _fail(message: str, text: str, position: int) -> None:
    from json import JSONDecodeError  # a malformed document only

    raise JSONDecodeError(message, text, position)


def dumps(value: object) -> str:
    """One line (json.dumps)."""
    return "".join(_encode(value, 0))


def dumps_indented(value: object, level: int = 0) -> str:
    """As ``json.dumps(value, indent=2)``."""
    if isinstance(value, dict) and value:
        inner = "\n" + "  " * (level + 1)
        items = (
            inner + _key(key) + ": " + dumps_indented(item, level + 1)
            for key, item in value.items()
        )
        return "{" + ",".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list | tuple) and value:
        inner = "\n" + "  " * (level + 1)
        items = (inner + dumps_indented(item, level + 1) for item in value)
        return "[" + ",".join(items) + "\n" + "  " * level + "]"
    return dumps(value)


def _key(key: object) -> str:
    # json.dumps' keys: a string as it is, other scalars as their JSON text.
    if isinstance(key, str):
        return str(_json.encode_basestring_ascii(key))
    if key is None or isinstance(key, bool | int | float):
        return str(_json.encode_basestring_ascii(dumps(key)))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
