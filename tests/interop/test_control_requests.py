"""Raw control requests of every wrong shape get one clear error line, never an internal
exception name, and leave no traceback in the daemon's log (the fixture checks the log)."""

import json
import socket

import pytest

from tests.harness.served import Served

BAD = [
    (b"not json", "not JSON"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({"op": "status", "args": [1]}).encode(), "args must be an object"),
    (json.dumps({"op": 5}).encode(), "expected"),
    (json.dumps([1, 2]).encode(), "expected"),
    (
        json.dumps({"op": "checkpoint-list", "args": {"vm": ["x"]}}).encode(),
        "'vm' must be a string",
    ),
    (json.dumps({"op": "checkpoint-list", "args": {}}).encode(), "'vm' is required"),
    (
        json.dumps({"op": "checkpoint-create", "args": {"vm": "v", "granularity": "big"}}).encode(),
        "'granularity' must be an integer",
    ),
    (
        json.dumps({"op": "checkpoint-create", "args": {"vm": "v", "granularity": True}}).encode(),
        "'granularity' must be an integer",
    ),
    (
        json.dumps({"op": "backup-begin", "args": {"vm": "v", "no_checkpoint": "yes"}}).encode(),
        "'no_checkpoint' must be true or false",
    ),
    (json.dumps({"op": "backup-end", "args": {"vm": "v", "id": {"a": 1}}}).encode(), "'id' must"),
    (
        json.dumps({"op": "checkpoint-list", "args": {"vm": "v", "x": 1}}).encode(),
        "unknown argument",
    ),
    (json.dumps({"op": "no-such-op"}).encode(), "unknown control operation"),
    (
        json.dumps(
            {"op": "backup-begin", "args": {"vm": "v", "checkpoint": "c", "no_checkpoint": True}}
        ).encode(),
        "'checkpoint' and 'no_checkpoint' exclude each other",
    ),
    (json.dumps({"op": "status", "args": {"deep": [[[[[[[]]]]]]]}}).encode(), "unknown argument"),
]


def ask(path: str, line: bytes) -> dict:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(line + b"\n")
        with sock.makefile("rb") as f:
            return dict(json.loads(f.readline()))


@pytest.mark.parametrize(("line", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_request_gets_one_clear_line(nbdsrv: Served, line: bytes, message: str) -> None:
    answer = ask(nbdsrv.control, line)
    assert answer["ok"] is False
    error = answer["error"]
    assert error["code"] == "bad-request", error
    assert message in error["message"] and "\n" not in error["message"], error
    assert ask(nbdsrv.control, b'{"op": "status"}')["ok"] is True  # still serving
