"""A client with 64-bit extended headers (nbdsrv's own NBDClient): WRITE with PAYLOAD_LEN,
and a zeroing longer than 32 bits, which goes to QEMU in pieces."""

import random
from pathlib import Path

from nbdsrv.net.address import Address
from nbdsrv.net.client import NBDClient
from nbdsrv.restore.sessions import BeginRestore
from tests.restore.conftest import Served

MiB = 1024 * 1024
GiB = 1024 * MiB


async def test_extended_headers_write_and_zero_past_32_bits(
    restore: Served, tmp_path: Path
) -> None:
    began = await restore.sessions.begin(
        BeginRestore(image=str(tmp_path / "big.qcow2"), size=8 * GiB)
    )
    client = await NBDClient.connect(Address("unix", path=restore.socket), began["export"])
    try:
        assert client.extended
        data = random.Random(8).randbytes(MiB)
        await client.write(5 * GiB, data)
        await client.write(0, data)
        assert await client.read(5 * GiB, MiB) == data
        await client.write_zeroes(0, 6 * GiB)  # past 32 bits: split for QEMU
        await client.flush()
        assert await client.read(0, MiB) == bytes(MiB)
        assert await client.read(5 * GiB, MiB) == bytes(MiB)
        await client.write(7 * GiB, data, flags=1)  # FUA
        assert await client.read(7 * GiB, MiB) == data
    finally:
        await client.close()
    assert restore.sessions.list()[0]["written_bytes"] == 3 * MiB + 6 * GiB
    await restore.sessions.end(began["id"])
