"""docs/api.md stays true: it names every operation of the table and every error code the
tree can give."""

import re
from pathlib import Path

from nbdsrv import errors
from nbdsrv.backends.libvirt import connection as libvirt_connection
from nbdsrv.backends.libvirt import vm as libvirt_vm
from nbdsrv.backends.qmp import external_snapshots, quiesce
from nbdsrv.backup import checkpoints, sessions, store
from nbdsrv.operations import OPERATIONS
from nbdsrv.qemu import errors as qemu_errors
from nbdsrv.qemu import guest_agent
from nbdsrv.restore import errors as restore_errors

API = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
# Every module that defines part of the tree (errors.py draws them all).
MODULES = (
    errors,
    checkpoints,
    sessions,
    store,
    external_snapshots,
    quiesce,
    libvirt_connection,
    libvirt_vm,
    qemu_errors,
    guest_agent,
    restore_errors,
)


def error_classes() -> set[type[errors.NbdsrvError]]:
    found: set[type[errors.NbdsrvError]] = set()
    pending = [errors.NbdsrvError]
    while pending:
        cls = pending.pop()
        found.add(cls)
        pending.extend(cls.__subclasses__())
    return found - {errors.NbdsrvError}


def test_every_operation_is_documented() -> None:
    for op in OPERATIONS:
        assert f"| `{op.name}` |" in API, op.name


def test_every_error_code_is_documented_and_drawn_in_the_tree() -> None:
    assert all(MODULES)  # imported so that every class of the tree is known
    tree = errors.__doc__ or ""
    documented = set(re.findall(r"`([a-z-]+)`", API))
    for cls in error_classes():
        assert "code" in vars(cls), f"{cls.__name__} has no code of its own"
        assert cls.code in documented, f"{cls.__name__}: code {cls.code} not in docs/api.md"
        assert re.search(rf"{cls.__name__}\b.*\n?.*\b{re.escape(cls.code)}\b", tree), cls
