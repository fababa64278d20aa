"""The command line is built from the operation table (nbdsrv/operations.py): every
operation has its command, options reach the request as the daemon checks them, --json and
--control work before or after the command, and every usage error is one line, exit 1."""

import subprocess
import sys

import pytest

from nbdsrv import cli
from nbdsrv.control_requests import check_arguments
from nbdsrv.errors import UsageError
from nbdsrv.operations import OPERATIONS, Operation


def parse(argv: list[str]) -> dict[str, object]:
    return vars(cli.build_parser().parse_args(argv))


def nbdsrv(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdsrv", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def sample_line(op: Operation) -> list[str]:
    """A full command line for ``op``: every positional, and every option given."""
    line = list(op.words)
    taken: set[str] = set()
    for arg in op.args:
        if arg.positional:
            line.append("word")
        elif arg.exclusive in taken:
            continue
        elif arg.kind == "bool":
            line.append(arg.flag)
        else:
            line += [arg.flag, arg.choices[0] if arg.choices else "7"]
        if arg.exclusive:
            taken.add(arg.exclusive)
    return line


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_every_operation_has_a_command_whose_request_the_daemon_accepts(op: Operation) -> None:
    args = cli.build_parser().parse_args(sample_line(op))
    assert args.operation is op
    request = cli._request(op, args)
    assert set(request) == {arg.name for arg in op.args}
    check_arguments(op, request)  # raises on anything the daemon would refuse


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_options_not_given_are_sent_as_null_or_false(op: Operation) -> None:
    line = list(op.words) + ["word" for arg in op.args if arg.positional and arg.required]
    request = cli._request(op, cli.build_parser().parse_args(line))
    for arg in op.args:
        if not arg.positional:
            assert request[arg.name] is (False if arg.kind == "bool" else None)


def test_a_path_argument_is_sent_absolute() -> None:
    op = next(op for op in OPERATIONS if op.name == "snapshot-create")
    request = cli._request(
        op, cli.build_parser().parse_args(["snapshot", "create", "vm", "--dir", "d"])
    )
    assert request["dir"].startswith("/") and request["dir"].endswith("/d")


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--control", "/c", "status"],
        ["status", "--json", "--control", "/c"],
        ["--json", "status", "--control", "/c"],
        ["--control", "/c", "status", "--json"],
    ],
    ids=" ".join,
)
def test_client_options_go_before_or_after_the_command(argv: list[str]) -> None:
    args = parse(argv)
    assert args["json"] is True and args["control"] == "/c"


def test_client_options_after_the_command_win() -> None:
    assert parse(["--control", "/a", "status", "--control", "/b"])["control"] == "/b"
    assert parse(["--control", "/a", "daemon", "--control", "/b"])["control"] == "/b"
    assert parse(["--control", "/a", "daemon"])["control"] == "/a"


@pytest.mark.parametrize(
    ("given", "sent"),
    [("1073741824", 1 << 30), ("64M", 64 << 20), ("64MiB", 64 << 20), ("1g", 1 << 30), ("0", 0)],
)
def test_a_byte_count_takes_the_suffixes_qemu_img_takes(given: str, sent: int) -> None:
    op = next(op for op in OPERATIONS if op.name == "restore-begin")
    args = cli.build_parser().parse_args(["restore", "begin", "--image", "i", "--size", given])
    assert cli._request(op, args)["size"] == sent
    args = cli.build_parser().parse_args(["checkpoint", "create", "vm", "--granularity", given])
    assert args.granularity == sent


USAGE_ERRORS = [
    [],
    ["bogus"],
    ["status", "extra"],
    ["status", "--bogus"],
    ["status", "--control"],
    ["checkpoint"],
    ["checkpoint", "create"],
    ["checkpoint", "create", "vm", "--granularity", "x"],
    ["restore", "begin", "--image", "i", "--size", "1.5G"],
    ["restore", "begin", "--image", "i", "--size", "64X"],
    ["backup", "begin", "vm", "--checkpoint", "a", "--no-checkpoint"],
    ["backup", "end", "vm"],
    ["daemon", "--tls", "bogus"],
    ["daemon", "--scratch-limit", "lots"],
    ["serve"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(nothing)")
def test_a_usage_error_is_one_line_and_exit_1(argv: list[str]) -> None:
    result = nbdsrv(*argv)
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdsrv: error: "), result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["backup", "begin", "-h"], ["--version"]])
def test_help_and_version_exit_0(argv: list[str]) -> None:
    result = nbdsrv(*argv)
    assert result.returncode == 0 and result.stdout and result.stderr == ""


# Lines of every shape: each must parse as the parser with every command built parses it.
LINES = [
    *USAGE_ERRORS,
    ["--control", "/c", "status"],
    ["--control=/c", "--json", "status", "--control", "/d"],
    ["--", "status"],
    ["--json", "backup", "begin", "vm", "--from", "c1", "--no-checkpoint"],
    ["--cont", "/c", "status"],
    ["checkpoint", "create", "vm", "--gran", "131072"],
    ["snapshot", "commit", "vm", "--json"],
    ["--control", "status", "status"],
    ["--connect", "nbdsrv+tls://h:1", "--tls-certificates", "/d", "backup", "list", "vm"],
    ["--tls-certificates", "status", "checkpoint", "list", "vm"],
    ["--connect=nbdsrv+tls://h", "status", "--json"],
]


@pytest.mark.parametrize("argv", LINES, ids=lambda a: " ".join(a) or "(nothing)")
def test_a_line_parses_alike_with_only_its_command_built(argv: list[str]) -> None:
    def outcome(parser: object) -> object:
        try:
            return vars(parser.parse_args(argv))  # type: ignore[attr-defined]
        except UsageError as e:
            return str(e)

    assert outcome(cli.build_parser(cli.command_in(argv))) == outcome(cli.build_parser())
