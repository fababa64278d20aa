"""The point in time and external snapshots see their VM through a declared protocol
(PointInTimeHost, SnapshotHost), never QmpVM itself: they import nothing of vm.py."""

import ast
from pathlib import Path

import pytest

import nbdsrv.backends.qmp

QMP = Path(nbdsrv.backends.qmp.__file__).parent


@pytest.mark.parametrize(
    "module", ["point_in_time.py", "external_snapshots.py", "scratch_limit.py"]
)
def test_module_does_not_import_the_vm(module: str) -> None:
    source = (QMP / module).read_text()
    imported = [
        f"{'.' * node.level}{node.module or ''}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
    ]
    assert ".vm" not in imported and "nbdsrv.backends.qmp.vm" not in imported, imported
