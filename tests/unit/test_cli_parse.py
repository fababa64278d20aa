"""The command line parses the same however little of it is built: a plain client command line
parsed without argparse (cli._parse_plain), any line with only its own command's options
built (cli.build_parser(command)), and argparse with every command built agree on the result,
the help and the errors."""

import contextlib
import io
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdsrv import cli

FULL = cli.build_parser()


def _argparse(argv: list[str], parser: object = FULL) -> tuple[object, str, str]:
    """(the parsed options, or the exit status, stdout, stderr) of argparse on argv."""
    assert hasattr(parser, "parse_args")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            result: object = vars(parser.parse_args(argv, SimpleNamespace()))
        except SystemExit as e:
            result = e.code
    return result, stdout.getvalue(), stderr.getvalue()


# Every help text and a sample of command lines, good and bad.
ARGVS = [
    [],
    ["-h"],
    ["--version"],
    ["bogus"],
    ["-1", "status"],
    ["--", "status"],
    ["daemon", "-h"],
    ["daemon", "--tls", "bogus"],
    ["serve", "-h"],
    ["serve"],
    ["status", "-h"],
    ["status", "--control"],
    ["status", "--cont", "/c", "--js"],
    ["status", "--bogus"],
    ["checkpoint"],
    ["checkpoint", "-h"],
    ["checkpoint", "create", "-h"],
    ["checkpoint", "create", "vm", "--granularity", "x"],
    ["checkpoint", "list", "-h"],
    ["checkpoint", "delete", "-h"],
    ["backup", "-h"],
    ["backup", "begin", "-h"],
    ["backup", "begin", "vm", "--checkpoint", "a", "--no-checkpoint"],
    ["backup", "list", "-h"],
    ["backup", "end", "-h"],
    ["backup", "end", "vm"],
    ["snapshot", "-h"],
    ["snapshot", "create", "-h"],
    ["snapshot", "commit", "-h"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_a_command_parses_as_with_every_command_built(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    lazy = cli.build_parser(cli._command_in(argv))
    assert _argparse(argv, lazy) == _argparse(argv)


# Plain lines of every client command, as scripts and the benchmark write them.
PLAIN = [
    ["status"],
    ["status", "--json", "--control", "/run/c.sock"],
    ["checkpoint", "create", "vm", "--name", "c1", "--granularity", "131072", "--quiesce"],
    ["checkpoint", "list", "vm", "--json"],
    ["checkpoint", "delete", "vm", "c1", "--control", "/c"],
    ["backup", "begin", "vm", "--no-checkpoint"],
    ["backup", "begin", "vm", "--from", "c1", "--checkpoint", "c2", "--all-checkpoints"],
    ["backup", "begin", "vm", "--from", "c1", "--bitmap-name", "b", "--quiesce", "--json"],
    ["backup", "list", "vm"],
    ["backup", "end", "vm", "0f3a", "--json"],
    ["snapshot", "create", "vm", "--dir", "/d"],
    ["snapshot", "commit", "vm"],
    ["backup", "end", "vm", ""],  # an empty word is a positional for argparse too
    ["status", "--control", "a", "--control", "b"],  # the last one counts
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_a_plain_client_line_parses_as_argparse_parses_it(argv: list[str]) -> None:
    plain = cli._parse_plain(argv)
    assert plain is not None
    assert (vars(plain), "", "") == _argparse(argv)


# Lines argparse must parse (or refuse) itself.
NOT_PLAIN = [
    *ARGVS,
    ["status", "--js"],
    ["status", "--control=/c"],
    ["status", "extra"],
    ["backup", "begin", "--no-checkpoint", "vm"],
    ["backup", "begin", "vm", "--from", "-1"],
    ["backup", "end", "vm", "-1"],
    ["checkpoint", "create", "vm", "--granularity", "0x10"],
    ["checkpoint", "create", "vm", "--name"],
    ["backup", "begin", "vm", "--checkpoint", "c", "--no-checkpoint"],
    ["daemon"],
]


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=" ".join)
def test_other_lines_are_left_to_argparse(argv: list[str]) -> None:
    assert cli._parse_plain(argv) is None


OPTIONS = sorted({w for line in PLAIN + NOT_PLAIN for w in line if w.startswith("-")})
VALUES = ["c1", "vm", "131072", "0x10", "-1", "", "x y", "--", "-", "status", "begin"]
# A piece of a command line: an option, an option and a value, or a word alone.
PIECES = st.one_of(
    st.sampled_from(OPTIONS).map(lambda o: [o]),
    st.tuples(st.sampled_from(OPTIONS), st.sampled_from(VALUES)).map(list),
    st.sampled_from(VALUES).map(lambda v: [v]),
)


@settings(max_examples=2000, deadline=None)
@given(
    start=st.sampled_from([line[:n] for line in PLAIN for n in range(5)]),
    pieces=st.lists(PIECES, max_size=4),
)
def test_what_parses_plainly_parses_so_with_argparse(
    start: list[str], pieces: list[list[str]]
) -> None:
    argv = start + [word for piece in pieces for word in piece]
    plain = cli._parse_plain(argv)
    if plain is not None:
        assert (vars(plain), "", "") == _argparse(argv)
