"""DirectWriter keeps the order of everything written to it, whether a buffer goes out at
once (``send``), partly, or waits behind others — checked by the bytes the peer reads."""

import asyncio
import random
import socket

from nbdsrv.net.direct_writer import DirectWriter

KiB = 1024


async def read_all(peer: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(peer, n - len(out))
        assert chunk, "the writer's side closed early"
        out += chunk
    return bytes(out)


async def test_send_goes_behind_what_waits_and_partly_sent_buffers_finish_in_order() -> None:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)  # fills at once
    ours.setblocking(False)
    peer.setblocking(False)
    failed: list[OSError] = []
    writer = DirectWriter(
        ours, on_drained=lambda: None, on_pressure=lambda high: None, on_failed=failed.append
    )
    rng = random.Random(3)
    pieces = [rng.randbytes(n) for n in (512 * KiB, 100, 300 * KiB, 7, 64 * KiB)]
    writer.send(pieces[0])  # nothing before it: part goes now, the rest is queued
    writer.send(pieces[1])  # behind the rest of the first
    writer.write([pieces[2]])
    writer.send(pieces[3])
    writer.write([pieces[4]])
    expected = b"".join(pieces)
    assert await read_all(peer, len(expected)) == expected
    assert not failed
    writer.close()
    ours.close()
    peer.close()


async def test_send_on_an_idle_writer_is_written_at_once() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    writer = DirectWriter(
        ours, on_drained=lambda: None, on_pressure=lambda high: None, on_failed=lambda e: None
    )
    writer.send(b"reply")
    assert writer.idle and writer.buffered == 0
    assert peer.recv(16) == b"reply"
    writer.close()
    ours.close()
    peer.close()
