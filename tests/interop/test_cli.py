"""The nbdsrv command line, run as users run it: status output, errors, signals."""

import os
import signal
import socket
import struct
from pathlib import Path

import pytest

from tests.harness.daemon import StartDaemon, nbdsrv_argv
from tests.harness.served import Served
from tests.harness.tools import require_tool, run, run_fails

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
NBD_OPT_EXPORT_NAME = 1
NBD_FLAG_C_FIXED_NEWSTYLE_NO_ZEROES = 3


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nbdsrv: error: ")]


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """stderr holds exactly one ``nbdsrv: error: …`` line, no traceback, naming fragments."""
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


def test_status_text_shows_listeners_and_exports(nbdsrv: Served) -> None:
    out = run(nbdsrv_argv("status", "--control", nbdsrv.control))
    lines = out.splitlines()
    assert lines[0].startswith(f"daemon pid {nbdsrv.daemon.pid}, ")
    [listening] = [line for line in lines if line.startswith("listening on: ")]
    assert f"unix:{nbdsrv.unix_socket}" in listening
    assert f"tcp:127.0.0.1:{nbdsrv.tcp_port}" in listening
    assert "exports (2):" in lines
    assert "  sparse: 8388608 bytes, base:allocation" in lines
    assert "  odd: 5000 bytes, base:allocation" in lines
    assert "sessions (0):" in lines


def test_status_json_fields(nbdsrv: Served) -> None:
    status = nbdsrv.daemon.status()
    assert status["pid"] == nbdsrv.daemon.pid
    assert status["control"] == nbdsrv.control
    assert sorted(status["listen"]) == sorted(
        [f"unix:{nbdsrv.unix_socket}", f"tcp:127.0.0.1:{nbdsrv.tcp_port}"]
    )
    assert status["vms"] == []
    assert status["sessions"] == []
    exports = {e["name"]: e for e in status["exports"]}
    assert set(exports) == {"sparse", "odd"}
    for name, image in nbdsrv.images.items():
        assert exports[name]["size"] == image.size
        assert exports[name]["contexts"] == ["base:allocation"]
        assert sorted(exports[name]["uris"]) == sorted(
            [nbdsrv.tcp_uri(name), nbdsrv.unix_uri(name)]
        )


def test_status_without_daemon_fails_with_one_error_line() -> None:
    result = run_fails(nbdsrv_argv("status", "--control", "/nonexistent"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [error_lines(result.stderr)[0]]
    assert "/nonexistent" in result.stderr


def test_status_on_a_dead_socket_fails_with_one_error_line(short_dir: Path) -> None:
    path = str(short_dir / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # a socket file nobody listens on, as a killed daemon leaves
        result = run_fails(nbdsrv_argv("status", "--control", path, "--json"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [error_lines(result.stderr)[0]]


@pytest.mark.parametrize(
    ("file_arg", "fragment"),
    [("bad", "'bad'"), ("=x", "'=x'"), ("x=/nonexistent", "/nonexistent")],
    ids=["no-equals", "no-name", "missing-file"],
)
def test_daemon_with_a_bad_file_option_exits_1_with_an_error(
    short_dir: Path, file_arg: str, fragment: str
) -> None:
    control = short_dir / "ctl.sock"
    unix = short_dir / "nbd.sock"
    argv = nbdsrv_argv(
        "daemon",
        *("--state-dir", str(short_dir / "state"), "--control", str(control)),
        *("--listen", f"unix:{unix}", "--file", file_arg),
    )
    result = run_fails(argv)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, fragment)
    assert not control.exists()
    assert not unix.exists()


def test_daemon_that_cannot_listen_exits_1_and_leaves_no_socket(short_dir: Path) -> None:
    control = short_dir / "ctl.sock"
    unix = short_dir / "nbd.sock"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = nbdsrv_argv(
            "daemon",
            *("--state-dir", str(short_dir / "state"), "--control", str(control)),
            *("--listen", f"unix:{unix}", "--listen", f"tcp:127.0.0.1:{port}"),
        )
        result = run_fails(argv)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, f"127.0.0.1:{port}")
    assert not control.exists()
    assert not unix.exists()  # the listener opened before the failure is gone too


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_stops_the_daemon_cleanly(
    nbdsrv_daemons: StartDaemon, short_dir: Path, sig: signal.Signals
) -> None:
    unix = short_dir / "sig.sock"
    daemon = nbdsrv_daemons("--listen", f"unix:{unix}", name="sig")
    assert unix.exists()
    assert daemon.stop(sig) == 0, daemon.log()
    assert not unix.exists()
    assert not os.path.exists(daemon.control)
    assert "Traceback" not in daemon.log()


def connect_in_transmission(path: str, export: str) -> socket.socket:
    """A raw client that has done the oldest handshake (NBD_OPT_EXPORT_NAME) and now idles
    in transmission."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    greeting = recv_exact(sock, 18)
    assert greeting[:16] == NBDMAGIC + IHAVEOPT, greeting
    name = export.encode()
    sock.sendall(
        struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE_NO_ZEROES)
        + IHAVEOPT
        + struct.pack(">II", NBD_OPT_EXPORT_NAME, len(name))
        + name
    )
    size, _flags = struct.unpack(">QH", recv_exact(sock, 10))
    assert size > 0
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def test_sigterm_with_clients_connected_stops_cleanly_and_closes_them(nbdsrv: Served) -> None:
    idle = connect_in_transmission(nbdsrv.unix_socket, "sparse")
    handshaking = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    handshaking.settimeout(30)
    handshaking.connect(nbdsrv.unix_socket)
    try:
        recv_exact(handshaking, 18)  # greeting read, client flags never sent
        assert nbdsrv.daemon.stop(signal.SIGTERM) == 0, nbdsrv.daemon.log()
        assert idle.recv(1) == b""  # the server closed it
        assert handshaking.recv(1) == b""
    finally:
        idle.close()
        handshaking.close()
    assert not os.path.exists(nbdsrv.unix_socket)


def test_listen_path_that_is_not_a_socket_is_refused_and_kept(short_dir: Path) -> None:
    precious = short_dir / "precious.txt"
    precious.write_text("not a socket\n")
    control = short_dir / "ctl.sock"
    argv = nbdsrv_argv(
        "daemon",
        *("--state-dir", str(short_dir / "state"), "--control", str(control)),
        *("--listen", f"unix:{precious}"),
    )
    result = run_fails(argv)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, str(precious))
    assert precious.read_text() == "not a socket\n"
    assert not control.exists()


@pytest.mark.parametrize("shared", ["control", "listen"])
def test_second_daemon_on_the_same_socket_is_refused_and_the_first_keeps_serving(
    nbdsrv: Served, short_dir: Path, shared: str
) -> None:
    control = nbdsrv.control if shared == "control" else str(short_dir / "second.ctl")
    unix = nbdsrv.unix_socket if shared == "listen" else str(short_dir / "second.sock")
    argv = nbdsrv_argv(
        "daemon",
        *("--state-dir", str(short_dir / "second.state"), "--control", control),
        *("--listen", f"unix:{unix}", "--file", f"other={nbdsrv.images['odd'].path}"),
    )
    result = run_fails(argv)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, "in use")
    # The first daemon still answers on both of its sockets.
    assert nbdsrv.daemon.status()["pid"] == nbdsrv.daemon.pid
    size = run([require_tool("nbdinfo"), "--size", nbdsrv.unix_uri("sparse")])
    assert int(size) == nbdsrv.images["sparse"].size


def test_client_vanishing_mid_reply_leaves_the_daemon_serving(
    nbdsrv: Served, tmp_path: Path
) -> None:
    sock = connect_in_transmission(nbdsrv.unix_socket, "sparse")
    size = nbdsrv.images["sparse"].size
    request = struct.Struct(">IHHQQI")  # magic, flags, type (0 = READ), cookie, offset, length
    sock.sendall(b"".join(request.pack(0x25609513, 0, 0, i, 0, size) for i in range(16)))
    sock.recv(4096)  # replies have started
    sock.close()  # with megabytes of replies still to come
    target = tmp_path / "copy.raw"
    run([require_tool("nbdcopy"), nbdsrv.unix_uri("sparse"), str(target)])
    assert target.read_bytes() == nbdsrv.images["sparse"].content()
    assert nbdsrv.daemon.status()["pid"] == nbdsrv.daemon.pid
