"""backup/ is pure rules (docs/architecture.md "Layers in short"): it imports no QEMU
building block and no backend, and names no QMP command; backends/qmp/ turns its rules into
QMP transactions."""

import ast
import re
from pathlib import Path

import pytest

import nbdsrv.backup

BACKUP = Path(nbdsrv.backup.__file__).parent
MODULES = sorted(BACKUP.glob("*.py"))
# What backup/ may not lean on: QEMU and the backends that drive it.
FORBIDDEN = ("nbdsrv.qemu", "qemu", "nbdsrv.backends.qmp", "nbdsrv.backends.libvirt", "libvirt")
# QMP commands are lowercase words joined by '-'; these are the families nbdsrv sends.
QMP_COMMAND = re.compile(
    r"\b(block-dirty-bitmap-[a-z]+|blockdev-[a-z-]+|block-commit|block-job-[a-z]+|"
    r"job-[a-z]+|query-[a-z-]+|block-export-[a-z]+|nbd-server-[a-z]+|qom-[a-z]+|"
    r"object-(add|del))\b"
)


def imported_modules(source: str) -> list[str]:
    """Every module a module of backup/ with ``source`` imports, relative imports made
    absolute."""
    package = "nbdsrv.backup"
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            out += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return out


def test_the_scan_sees_every_module() -> None:
    assert {p.name for p in MODULES} >= {"checkpoints.py", "sessions.py", "snapshots.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_backup_imports_no_qemu_and_no_backend(path: Path) -> None:
    wrong = [
        name
        for name in imported_modules(path.read_text())
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not wrong, f"backup/{path.name} imports {wrong}: QEMU belongs in backends/qmp/"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_backup_names_no_qmp_command(path: Path) -> None:
    found = sorted({m.group(0) for m in QMP_COMMAND.finditer(path.read_text())})
    assert not found, f"backup/{path.name} names QMP commands {found}: move them to backends/qmp/"


def test_the_checks_catch_what_they_look_for() -> None:
    imported = imported_modules("from ..qemu.names import disk_name\nimport qemu.qmp\n")
    assert "nbdsrv.qemu.names" in imported and "qemu.qmp" in imported
    assert "nbdsrv.backends.qmp" in imported_modules("from ..backends import qmp\n")
    assert QMP_COMMAND.search('("block-dirty-bitmap-add", {})')
    assert QMP_COMMAND.search("``blockdev-snapshot``")
