"""Every pointer into the tree that the docs and the code's comments give leads somewhere.

Checked in docs/**/*.md, README.md, and the comments and docstrings of nbdsrv/, tests/ and
bench/:

- paths under the tree's top folders: `nbdsrv/qemu/fleece.py`, `tests/guest/`,
  `docs/libvirt.md`, and `nbdsrv/qemu/chain.py:Disk` (a name in that module);
- dotted names: `nbdsrv.qemu.chain`, `nbdsrv.proto.errors.nbd_errno`,
  `nbdsrv.qemu.monitor.Monitor.execute` (a module, then a name in it, then a member of a
  class: a method, a class attribute or an attribute its methods set on `self`); logger
  names (`nbdsrv.audit`) are no modules and pass.

A path names a file (with its extension, `tests/conftest.py`), a folder (with its trailing slash,
`tests/guest/`), or has two levels below the top folder (`tests/guest/vm`); so the ratio
`nbdsrv/qemu-nbd` in a table is no path. Paths under folders that .gitignore anchors
(bench/work/, where `make bench` writes) pass.

Names are found by reading the modules' source (nothing is imported). A pointer that leads
nowhere is reported with the file and line that gives it.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_FOLDERS = ("nbdsrv", "tests", "bench", "docs", "scripts")

# Not preceded by a path, a dotted name or a URL: `/var/lib/nbdsrv/x` is no pointer.
_BEFORE = r"(?<![\w./~$@-])"
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
PATH = re.compile(_BEFORE + rf"((?:{'|'.join(TOP_FOLDERS)})/(?:[\w.-]+/)*[\w.-]*)(?::({_NAME}))?")
DOTTED = re.compile(_BEFORE + r"(nbdsrv(?:\.[A-Za-z_]\w*)+)")


@dataclass(frozen=True)
class Pointer:
    where: str
    """file:line that gives it"""
    text: str


def is_path(path: str) -> bool:
    """Whether a match of PATH names a file or folder (see the module's docstring)."""
    below = path.split("/")[1:]
    return path.endswith("/") or "." in below[-1] or len(below) > 1


def pointers_in(text: str, where: str, first_line: int = 1) -> Iterator[Pointer]:
    """Every pointer in a piece of prose (a doc, a comment, a docstring)."""
    for number, line in enumerate(text.splitlines(), first_line):
        for match in PATH.finditer(line):
            if is_path(match.group(1).rstrip(".")):
                yield Pointer(f"{where}:{number}", match.group(0).rstrip("."))
        for match in DOTTED.finditer(line):
            yield Pointer(f"{where}:{number}", match.group(1))


def prose_of_python(source: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of every comment and docstring of a module."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            # Docstrings, and the attribute docstrings that follow an assignment.
            for i, statement in enumerate(body):
                if (
                    isinstance(statement, ast.Expr)
                    and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)
                    and (i == 0 or isinstance(body[i - 1], ast.Assign | ast.AnnAssign))
                ):
                    yield statement.lineno, statement.value.value


def pointers_in_python(source: str, where: str) -> Iterator[Pointer]:
    for line, text in prose_of_python(source):
        yield from pointers_in(text, where, line)


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@cache
def members(path: Path) -> dict[str, ast.AST]:
    """Top-level names a module defines or imports."""
    return names_in(ast.parse(path.read_text()).body)


def names_in(body: list[ast.stmt]) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for statement in body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[statement.name] = statement
        elif isinstance(statement, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        names[node.id] = statement
        elif isinstance(statement, ast.Import | ast.ImportFrom):
            for alias in statement.names:
                names[(alias.asname or alias.name).split(".")[0]] = statement
        elif isinstance(statement, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody"):
                names.update(names_in(getattr(statement, block, [])))
            for handler in getattr(statement, "handlers", []):
                names.update(names_in(handler.body))
    return names


def class_members(cls: ast.ClassDef) -> set[str]:
    """Names of a class: its body's, and the attributes its methods set on `self`."""
    found = set(names_in(cls.body))
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            found.add(node.attr)
    return found


def name_exists(module: Path, dotted: list[str]) -> bool:
    """Whether `A.b` names something in the module: a top-level name, then class members."""
    node = members(module).get(dotted[0])
    if node is None:
        return False
    for part in dotted[1:]:
        if not isinstance(node, ast.ClassDef):
            return True  # past a class member (an instance's attribute): not followed
        if part not in class_members(node):
            return False
        node = names_in(node.body).get(part, ast.Pass())
    return True


@cache
def generated_folders() -> tuple[str, ...]:
    """Folders the tools write into (bench/work/): anchored folders in .gitignore."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return tuple(line[1:] for line in lines if line.startswith("/") and line.endswith("/"))


@cache
def logger_names() -> frozenset[str]:
    """Names given to logging.getLogger in nbdsrv/ (nbdsrv.audit): dotted, yet no module."""
    pattern = re.compile(r"getLogger\(\"([\w.]+)\"\)")
    return frozenset(
        name
        for module in (ROOT / "nbdsrv").rglob("*.py")
        for name in pattern.findall(module.read_text())
    )


def broken(pointer: str) -> str | None:
    """Why `pointer` leads nowhere, or None when it leads somewhere."""
    if match := PATH.fullmatch(pointer):
        path, name = match.group(1), match.group(2)
        if (path + "/").startswith(generated_folders()):
            return None
        if not (ROOT / path).exists():
            return "no such file or folder"
        if (
            name is not None
            and path.endswith(".py")
            and not name_exists(ROOT / path, name.split("."))
        ):
            return f"{path} defines no {name}"
        return None
    if pointer in logger_names():
        return None
    parts = pointer.split(".")
    for cut in range(len(parts), 0, -1):
        module = module_file(parts[:cut])
        if module is not None:
            if cut == len(parts) or name_exists(module, parts[cut:]):
                return None
            # nbdsrv.backup (a package) may also be a prefix of nbdsrv.backup.store.X.
            if module.name != "__init__.py":
                return f"{module.relative_to(ROOT)} defines no {'.'.join(parts[cut:])}"
    return "no such module"


@dataclass(frozen=True)
class Prose:
    where: str
    """the file"""
    first_line: int
    text: str


def tree_prose() -> Iterator[Prose]:
    """The docs, and the comments and docstrings of the code, of the whole tree."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        yield Prose(str(doc.relative_to(ROOT)), 1, doc.read_text())
    for folder in ("nbdsrv", "tests", "bench"):
        for module in sorted((ROOT / folder).rglob("*.py")):
            if module == Path(__file__).resolve():
                continue  # its examples are meant to be broken
            for line, text in prose_of_python(module.read_text()):
                yield Prose(str(module.relative_to(ROOT)), line, text)


@pytest.fixture(scope="module")
def prose() -> list[Prose]:
    return list(tree_prose())


@pytest.fixture(scope="module")
def pointers(prose: list[Prose]) -> list[Pointer]:
    return [p for piece in prose for p in pointers_in(piece.text, piece.where, piece.first_line)]


def test_every_pointer_in_docs_and_comments_leads_somewhere(pointers: list[Pointer]) -> None:
    bad = [f"{p.where}: {p.text} ({why})" for p in pointers if (why := broken(p.text))]
    assert bad == [], "\n".join(bad)


# The team's notes outside the repository: users do not have them.
OUTSIDE = re.compile(r"\.\./shared/|\bshared/research/|\b(?:DESIGN|CONTRACT|STYLE)\.md\b")


def outside_pointers(text: str, where: str, first_line: int = 1) -> Iterator[Pointer]:
    for number, line in enumerate(text.splitlines(), first_line):
        for match in OUTSIDE.finditer(line):
            yield Pointer(f"{where}:{number}", match.group(0))


def test_no_pointer_leaves_the_repository(prose: list[Prose]) -> None:
    found = [
        p for piece in prose for p in outside_pointers(piece.text, piece.where, piece.first_line)
    ]
    assert found == [], "\n".join(f"{p.where}: {p.text}" for p in found)


def test_a_planted_pointer_outside_the_repository_is_found() -> None:
    text = "see ../shared/CONTRACT.md and DESIGN.md decision 3"
    assert [p.text for p in outside_pointers(text, "x")] == [
        "../shared/",
        "CONTRACT.md",
        "DESIGN.md",
    ]


def test_the_check_finds_pointers(pointers: list[Pointer]) -> None:
    """A check that found nothing could not fail: the tree has pointers of every kind."""
    texts = {p.text for p in pointers}
    assert {"docs/architecture.md", "nbdsrv/qemu/fleece.py"} <= texts
    assert any(DOTTED.fullmatch(t) for t in texts)
    assert any(PATH.fullmatch(t) and ".py:" in t for t in texts)


PLANTED = '''"""Module docstring pointing at nbdsrv/qemu/no_such_file.py."""

# a comment citing nbdsrv.qemu.monitor.NoSuchName
x = 1
"""An attribute docstring citing nbdsrv/qemu/chain.py:NoSuchFunction."""


class A:
    def f(self) -> None:
        """See tests/no_such_folder/ and nbdsrv.qemu.monitor.Monitor.no_such_method."""
        s = "nbdsrv/not/a/pointer.py: code strings are not read"
'''


@pytest.mark.parametrize(
    ("pointer", "why"),
    [
        ("nbdsrv/qemu/no_such_file.py", "no such file or folder"),
        ("nbdsrv.qemu.monitor.NoSuchName", "nbdsrv/qemu/monitor.py defines no NoSuchName"),
        ("nbdsrv/qemu/chain.py:NoSuchFunction", "nbdsrv/qemu/chain.py defines no NoSuchFunction"),
        ("tests/no_such_folder/", "no such file or folder"),
        (
            "nbdsrv.qemu.monitor.Monitor.no_such_method",
            "nbdsrv/qemu/monitor.py defines no Monitor.no_such_method",
        ),
        ("nbdsrv.no_such_module", "no such module"),
        ("nbdsrv/faults/", "no such file or folder"),
    ],
)
def test_a_planted_bad_pointer_is_found(pointer: str, why: str) -> None:
    assert broken(pointer) == why


def test_planted_pointers_are_read_from_comments_and_docstrings_only() -> None:
    found = [p.text for p in pointers_in_python(PLANTED, "planted.py")]
    assert sorted(found) == sorted(
        [
            "nbdsrv/qemu/no_such_file.py",
            "nbdsrv.qemu.monitor.NoSuchName",
            "nbdsrv/qemu/chain.py:NoSuchFunction",
            "tests/no_such_folder/",
            "nbdsrv.qemu.monitor.Monitor.no_such_method",
        ]
    )
    assert all(broken(p) for p in found)


@pytest.mark.parametrize(
    "pointer",
    [
        "nbdsrv/qemu/chain.py",
        "nbdsrv/qemu/",
        "docs/architecture.md",
        "nbdsrv.qemu.chain",
        "nbdsrv.qemu.monitor.Monitor.execute",
        "nbdsrv/qemu/storage_daemon.py:StorageDaemon.start",
        "nbdsrv.qemu.storage_daemon.StorageDaemon.live_socket",  # set on self in __init__
        "nbdsrv.audit",  # a logger
        "bench/work/results.json",  # written by make bench
    ],
)
def test_good_pointers_pass(pointer: str) -> None:
    assert broken(pointer) is None


def test_text_that_is_no_pointer_is_not_read_as_one() -> None:
    prose = (
        "state in /var/lib/nbdsrv/control.sock, https://example.org/tests/x, ~/nbdsrv/x; "
        "time nbdsrv/qemu-nbd 1.28"
    )
    assert list(pointers_in(prose, "prose")) == []
