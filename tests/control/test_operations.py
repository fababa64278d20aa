"""The operation table (nbdsrv/operations.py) is the one place an operation is defined: the
daemon has a handler for each, names and arguments follow the rules the CLI and the request
checks rely on."""

import inspect

import pytest

from nbdsrv.daemon import Daemon
from nbdsrv.operations import BY_NAME, GROUPS, OPERATIONS, Operation


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_every_operation_has_a_handler_in_the_daemon(op: Operation) -> None:
    handler = getattr(Daemon, op.handler, None)
    assert handler is not None and inspect.iscoroutinefunction(handler)


def test_operation_names_are_their_command_words() -> None:
    assert len(BY_NAME) == len(OPERATIONS)
    for op in OPERATIONS:
        assert op.name == "-".join(op.words)
        assert len(op.words) == 1 or op.words[0] in GROUPS


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_arguments_are_well_formed(op: Operation) -> None:
    names = [arg.name for arg in op.args]
    assert len(names) == len(set(names))
    for arg in op.args:
        assert arg.kind in ("str", "path", "int", "bytes", "bool")
        assert not (arg.positional and arg.kind == "bool")
        assert not (arg.positional and arg.exclusive)
        assert arg.help
    # An optional positional can only be the last one.
    positionals = [arg for arg in op.args if arg.positional]
    assert all(arg.required for arg in positionals[:-1])
