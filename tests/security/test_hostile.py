"""Hostile clients against a live daemon: stalls, giant lengths, too many connections,
unread replies and a seeded random fuzzer. Throughout, well-behaved clients are served and
the daemon's memory stays bounded (VmRSS from /proc, with generous bounds; no timings).

The fuzzer's seed is ``NBDSRV_FUZZ_SEED`` (default 6) and its rounds ``NBDSRV_FUZZ_ROUNDS``
(default 300); it also stops after ``FUZZ_TIME_CAP`` seconds so a slow machine ends it early.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.daemon import StartDaemon
from tests.harness.images import ImageFile
from tests.harness.served import Served, serve_images
from tests.harness.tools import require_tool, run
from tests.harness.waiting import wait_for
from tests.proto import spec

from .certs import Certs

# Liveness guard only: a server that never answers fails the test instead of hanging it.
GUARD = 30.0
MiB = 1024 * 1024
FUZZ_TIME_CAP = 90.0


# -- a blocking raw client written from the spec -----------------------------------------------


def connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.tcp_port), timeout=GUARD)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def closed_by_server(sock: socket.socket) -> bool:
    """Read and discard until the server closes: True, or False when the guard runs out."""
    sock.settimeout(GUARD)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def option_reply(sock: socket.socket) -> tuple[int, bytes]:
    _, _, rtype, length = spec.L_OPTION_REPLY.unpack(recv_exactly(sock, spec.L_OPTION_REPLY.size))
    return rtype, recv_exactly(sock, length)


def negotiate(sock: socket.socket, export: str) -> int:
    """Greeting, client flags, NBD_OPT_GO (simple replies); returns the export size."""
    assert recv_exactly(sock, spec.L_GREETING.size) == spec.greeting()
    sock.sendall(spec.u32(3) + spec.option(spec.OPT_GO, spec.info_data(export)))
    size = -1
    while True:
        rtype, payload = option_reply(sock)
        if rtype == spec.REP_INFO and payload[:2] == spec.u16(spec.INFO_EXPORT):
            size = struct.unpack(">Q", payload[2:10])[0]
        if rtype != spec.REP_INFO:
            assert rtype == spec.REP_ACK, hex(rtype)
            return size


def pread(sock: socket.socket, offset: int, length: int, cookie: int = 1) -> bytes:
    sock.sendall(spec.request(spec.CMD_READ, cookie, offset, length))
    magic, error, got = spec.L_SIMPLE.unpack(recv_exactly(sock, spec.L_SIMPLE.size))
    assert (magic, error, got) == (spec.SIMPLE_REPLY_MAGIC, 0, cookie)
    return recv_exactly(sock, length)


def well_behaved_read(served: Served) -> None:
    """A polite client reads a slice of every export and checks it."""
    for image in served.images.values():
        with connect(served) as sock:
            assert negotiate(sock, image.name) == image.size
            offset = image.size // 3
            length = min(65536, image.size - offset)
            assert pread(sock, offset, length) == image.content()[offset : offset + length]
            sock.sendall(spec.request(spec.CMD_DISC, 0, 0, 0))
            assert closed_by_server(sock)


def audit_lines(served: Served, text: str) -> list[str]:
    return [ln for ln in served.daemon.log().splitlines() if "nbdsrv.audit" in ln and text in ln]


@pytest.fixture
def start(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path
) -> Callable[..., Served]:
    def start(*args: str) -> Served:
        return serve_images(nbdsrv_daemons, test_images, short_dir, *args)

    return start


# -- deadlines ---------------------------------------------------------------------------------


def test_a_client_silent_after_the_greeting_is_dropped(start: Callable[..., Served]) -> None:
    served = start("--handshake-timeout", "1")
    with connect(served) as staller:
        assert recv_exactly(staller, spec.L_GREETING.size) == spec.greeting()
        well_behaved_read(served)  # others are served meanwhile
        assert closed_by_server(staller)
    assert audit_lines(served, "handshake not finished")


def test_a_client_trickling_its_handshake_is_dropped(start: Callable[..., Served]) -> None:
    # Every byte arrives well before any per-read timeout would fire; the deadline is for
    # the whole negotiation.
    served = start("--handshake-timeout", "1")
    slow = spec.u32(3) + spec.option(99, bytes(1000))
    with connect(served) as sock:
        recv_exactly(sock, spec.L_GREETING.size)
        for i in range(len(slow)):
            try:
                sock.sendall(slow[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break
        else:
            pytest.fail("the server waited for the whole trickled option")
        assert closed_by_server(sock)
    assert audit_lines(served, "handshake not finished")


def test_an_idle_client_is_dropped_after_the_idle_timeout(start: Callable[..., Served]) -> None:
    served = start("--idle-timeout", "1")
    with connect(served) as sock:
        negotiate(sock, "odd")
        assert pread(sock, 0, 100) == served.images["odd"].content()[:100]
        assert closed_by_server(sock)
    assert audit_lines(served, "idle for 1 s")


# -- giant lengths -----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x80000000, 1024 * 1024 + 1])
def test_a_giant_option_length_closes_the_connection_without_allocating(
    start: Callable[..., Served], length: int
) -> None:
    served = start()
    well_behaved_read(served)
    before = served.vm_rss_kib()
    for _ in range(20):
        with connect(served) as sock:
            recv_exactly(sock, spec.L_GREETING.size)
            sock.sendall(spec.u32(3) + spec.L_OPTION.pack(spec.IHAVEOPT, 99, length) + b"x" * 100)
            assert closed_by_server(sock)
    well_behaved_read(served)
    assert served.vm_rss_kib() - before < 32 * 1024


def test_a_full_size_option_is_answered(start: Callable[..., Served]) -> None:
    served = start()
    with connect(served) as sock:
        recv_exactly(sock, spec.L_GREETING.size)
        sock.sendall(spec.u32(3) + spec.option(99, bytes(1024 * 1024)))
        assert option_reply(sock)[0] == spec.REP_ERR_UNSUP
        sock.sendall(spec.option(spec.OPT_ABORT))
        assert option_reply(sock)[0] == spec.REP_ACK


def test_giant_request_lengths_are_refused_or_drained(start: Callable[..., Served]) -> None:
    served = start()
    well_behaved_read(served)
    before = served.vm_rss_kib()
    with connect(served) as sock:
        negotiate(sock, "sparse")
        sock.sendall(spec.request(spec.CMD_READ, 7, 0, 0xFFFFFFFF))
        assert spec.L_SIMPLE.unpack(recv_exactly(sock, 16)) == (
            spec.SIMPLE_REPLY_MAGIC,
            spec.EINVAL,
            7,
        )
        sock.sendall(spec.request(spec.CMD_READ, 8, (1 << 64) - 1, 0xFFFFFFFF))
        assert spec.L_SIMPLE.unpack(recv_exactly(sock, 16))[1] == spec.EINVAL
        # A write announcing 4 GiB of payload: thrown away as it comes, never buffered.
        sock.sendall(spec.request(spec.CMD_WRITE, 9, 0, 0xFFFFFFFF) + bytes(8 * MiB))
        well_behaved_read(served)
    well_behaved_read(served)
    assert served.vm_rss_kib() - before < 32 * 1024


def test_unread_replies_stay_within_the_per_connection_budget(
    start: Callable[..., Served], tmp_path: Path
) -> None:
    # 40 reads of 32 MiB whose replies the client never reads: without a budget the daemon
    # would hold 1.25 GiB of zeroes for this one client.
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(64 * MiB)
    served = start("--file", f"big={big}")
    well_behaved_read(served)
    before = served.vm_rss_kib()
    with connect(served) as hog:
        negotiate(hog, "big")
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        hog.sendall(b"".join(spec.request(spec.CMD_READ, c, 0, 32 * MiB) for c in range(40)))
        # Give the daemon every chance to overspend; the bound is on memory, not on time.
        peak = before
        for _ in range(20):
            time.sleep(0.1)
            peak = max(peak, served.vm_rss_kib())
        well_behaved_read(served)
    assert peak - before < 256 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"
    well_behaved_read(served)


# -- many connections --------------------------------------------------------------------------


def test_max_connections_refuses_the_extra_client_and_serves_after(
    start: Callable[..., Served],
) -> None:
    served = start("--max-connections", "4")
    holders = [connect(served) for _ in range(4)]
    try:
        for sock in holders:
            negotiate(sock, "odd")
        wait_for(lambda: served.daemon.status()["connections"] == 4, "4 connections")
        extra = connect(served)
        assert closed_by_server(extra)  # closed before any greeting
        extra.close()
        assert audit_lines(served, "--max-connections")
        for sock in holders[1:]:  # the held ones still serve
            assert pread(sock, 0, 10) == served.images["odd"].content()[:10]
        holders[0].sendall(spec.request(spec.CMD_DISC, 0, 0, 0))
        assert closed_by_server(holders[0])
        wait_for(lambda: served.daemon.status()["connections"] == 3, "a slot freed")
        out = run([require_tool("nbdinfo"), "--size", served.tcp_uri("odd")])
        assert out.strip() == str(served.images["odd"].size)
    finally:
        for sock in holders:
            sock.close()


def test_a_burst_of_connections_leaves_the_daemon_serving(start: Callable[..., Served]) -> None:
    served = start("--max-connections", "16", "--handshake-timeout", "2")
    socks = []
    for _ in range(100):
        try:
            socks.append(connect(served))
        except OSError:
            break
    for sock in socks:
        sock.close()
    wait_for(lambda: served.daemon.status()["connections"] == 0, "every connection gone")
    well_behaved_read(served)


# -- the fuzzer --------------------------------------------------------------------------------


def _fuzz_conversation(rng: random.Random, exports: list[str]) -> bytes:
    """A plausible conversation, then mutated: what a confused or hostile client sends."""
    name = rng.choice([*exports, "", "nope", "x" * 5000])
    parts = [spec.u32(rng.choice([0, 1, 2, 3, 3, 3, rng.getrandbits(32)]))]
    options = [
        lambda: spec.option(spec.OPT_LIST),
        lambda: spec.option(spec.OPT_STARTTLS),
        lambda: spec.option(spec.OPT_STRUCTURED_REPLY),
        lambda: spec.option(spec.OPT_EXTENDED_HEADERS),
        lambda: spec.option(spec.OPT_INFO, spec.info_data(name, (1, 2, 3))),
        lambda: spec.option(
            spec.OPT_SET_META_CONTEXT, spec.meta_data(name, ("base:allocation", "qemu:"))
        ),
        lambda: spec.option(spec.OPT_LIST_META_CONTEXT, spec.meta_data(name)),
        lambda: spec.option(rng.getrandbits(32), rng.randbytes(rng.randrange(64))),
        lambda: spec.L_OPTION.pack(spec.IHAVEOPT, rng.randrange(12), rng.getrandbits(32)),
    ]
    for _ in range(rng.randrange(5)):
        parts.append(rng.choice(options)())
    if rng.random() < 0.3:
        parts.append(spec.option(spec.OPT_EXPORT_NAME, name.encode()))
    else:
        parts.append(spec.option(spec.OPT_GO, spec.info_data(name)))
    for cookie in range(rng.randrange(20)):
        command = rng.choice([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, rng.getrandbits(16)])
        offset = rng.choice([0, rng.randrange(8 * MiB), rng.getrandbits(64)])
        length = rng.choice([1, 4096, rng.randrange(33 * MiB), rng.getrandbits(32)])
        flags = rng.choice([0, 0, rng.getrandbits(16)])
        parts.append(spec.request(command, cookie, offset, length, flags))
    data = bytearray(b"".join(parts))
    for _ in range(rng.choice([0, 1, 1, 2, 5, 20])):
        if not data:
            break
        what = rng.random()
        at = rng.randrange(len(data))
        if what < 0.5:
            data[at] = rng.getrandbits(8)
        elif what < 0.7:
            data[at:at] = rng.randbytes(rng.randrange(1, 32))
        elif what < 0.85:
            del data[at : at + rng.randrange(1, 32)]
        else:
            data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\0" * 4])
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def test_seeded_fuzzer_against_the_live_daemon(start: Callable[..., Served], certs: Certs) -> None:
    seed = int(os.environ.get("NBDSRV_FUZZ_SEED", "6"))
    rounds = int(os.environ.get("NBDSRV_FUZZ_ROUNDS", "300"))
    served = start(*certs.server_args, "--tls", "on", "--handshake-timeout", "3")
    rng = random.Random(seed)
    exports = list(served.images)
    well_behaved_read(served)
    before = served.vm_rss_kib()
    peak = before
    began = time.monotonic()
    done = 0
    for done in range(1, rounds + 1):
        data = _fuzz_conversation(rng, exports)
        with connect(served) as sock:
            recv_exactly(sock, spec.L_GREETING.size)
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            # The daemon must close every connection the client has finished with.
            assert closed_by_server(sock), f"round {done} (seed {seed}): {data[:200].hex()}"
        if done % 10 == 0:
            well_behaved_read(served)
            peak = max(peak, served.vm_rss_kib())
        if done % 100 == 0:
            run([require_tool("nbdinfo"), served.tcp_uri("sparse", certs.backup)])
        if time.monotonic() - began > FUZZ_TIME_CAP:
            break
    well_behaved_read(served)
    wait_for(lambda: served.daemon.status()["connections"] == 0, "every connection gone")
    after = served.vm_rss_kib()
    print(f"fuzzer: {done} rounds, seed {seed}, RSS {before} -> peak {peak} -> {after} KiB")
    assert max(peak, after) - before < 64 * 1024


def test_a_burst_of_200_clients_is_not_refused(start: Callable[..., Served]) -> None:
    """200 clients connect while the daemon is busy (stopped): none is refused by a full listen
    backlog, and each gets the greeting once the daemon runs again."""
    served = start("--max-connections", "300", "--handshake-timeout", "30")
    socks, refused = [], 0
    os.kill(served.daemon.pid, signal.SIGSTOP)
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)  # as asyncio and libnbd connect
            try:
                sock.connect(served.unix_socket)
                socks.append(sock)
            except BlockingIOError:
                refused += 1
                sock.close()
    finally:
        os.kill(served.daemon.pid, signal.SIGCONT)
    assert refused == 0
    for sock in socks:
        sock.setblocking(True)
        sock.settimeout(GUARD)
        assert recv_exactly(sock, 8) == b"NBDMAGIC"
        sock.close()
    wait_for(lambda: served.daemon.status()["connections"] == 0, "every connection gone")
    well_behaved_read(served)
