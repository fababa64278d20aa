"""A client that stops reading while its READs are answered, for tests of servers whose
replies must pile up (socket, pipe, queue) and then all arrive, in order."""

import asyncio

from nbdsrv.net.client import NBDClient

KiB = 1024


async def read_after_a_pause(client: NBDClient, size: int, rounds: int) -> bytes:
    """Read ``[0, size)`` ``rounds`` times by 256 KiB, all sent while the client does not
    read its socket for 0.3 s (none may complete meanwhile); the bytes in request order."""
    transport = client._link.transport
    assert transport is not None
    transport.pause_reading()
    reads = [
        asyncio.ensure_future(client.read(o, 256 * KiB))
        for _ in range(rounds)
        for o in range(0, size, 256 * KiB)
    ]
    await asyncio.sleep(0.3)  # the server writes until everything is full
    assert not any(r.done() for r in reads)
    transport.resume_reading()
    return b"".join(await asyncio.gather(*reads))
