#!/usr/bin/python3
"""Make many small writes at spread offsets through an NBD export, quickly.

Run with the system Python, which has libnbd's bindings (``python3-libnbd``); the project's
venv does not. One connection with up to 64 writes in flight.

Write ``i`` (0 ≤ i < COUNT) goes to one 64 KiB-aligned slot inside stride ``i`` of the disk
(``stride = SIZE // COUNT``), never in the first or last 64 KiB of the stride, so no two
writes share or touch a 64 KiB block: a 64 KiB-granularity dirty bitmap then has exactly
COUNT dirty runs and ``2 * COUNT + 1`` extents.

``--part K/N`` makes only the writes with ``i % N == K``: N runs with parts 0..N-1 (say with a
checkpoint between each) make the same blocks dirty as one run without.

Usage: ``dirty_writer.py URI COUNT SIZE [--length BYTES] [--seed N] [--part K/N]``; prints one
JSON line
``{"writes": COUNT, "seconds": ...}``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import nbd

GRAIN = 64 * 1024
IN_FLIGHT = 64


def offsets(count: int, size: int, seed: int) -> list[int]:
    stride = size // count
    slots = (stride - 2 * GRAIN) // GRAIN
    if slots < 1:
        raise SystemExit(f"dirty_writer: {count} writes do not fit in {size} bytes")
    rng = random.Random(seed)
    return [i * stride + GRAIN + rng.randrange(slots) * GRAIN for i in range(count)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("count", type=int)
    p.add_argument("size", type=int)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--part", default="0/1")
    args = p.parse_args()
    part, parts = (int(x) for x in args.part.split("/"))
    if not 0 < args.length <= GRAIN:
        raise SystemExit("dirty_writer: --length must be 1..65536")
    rng = random.Random(args.seed)
    buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(args.length)))
    h = nbd.NBD()
    h.connect_uri(args.uri)
    errors: list[int] = []

    def done(error: object) -> int:
        value = getattr(error, "value", 0)
        if value:
            errors.append(value)
        return 1  # retire the command

    t0 = time.perf_counter()
    for offset in offsets(args.count, args.size, args.seed)[part::parts]:
        while h.aio_in_flight() >= IN_FLIGHT:
            h.poll(-1)
        h.aio_pwrite(buf, offset, completion=done)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    if errors:
        raise SystemExit(f"dirty_writer: {len(errors)} writes failed (errno {errors[0]})")
    h.flush()
    elapsed = time.perf_counter() - t0
    h.shutdown()
    written = len(range(part, args.count, parts))
    print(json.dumps({"writes": written, "seconds": round(elapsed, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
