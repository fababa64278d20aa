"""Copy the dirty extents of an export into a file with libnbd, as a backup tool does.

Run with Debian's /usr/bin/python3 (python3-libnbd):
    incremental_copy.py URI CONTEXT TARGET
Prints the dirty (offset, length) extents as JSON. Only dirty ranges are read.
"""

import json
import os
import sys

import nbd

uri, context, target = sys.argv[1:4]
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
if not h.can_meta_context(context):
    sys.exit(f"server does not offer {context}")
size = h.get_size()
extents: list[tuple[int, int, int]] = []


def collect(meta: str, offset: int, entries: list[int], err: int) -> int:
    if meta == context:
        pos = offset
        for i in range(0, len(entries), 2):
            extents.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
    return 0


offset = 0
while offset < size:
    h.block_status(min(size - offset, (1 << 32) - (1 << 20)), offset, collect)
    offset = extents[-1][0] + extents[-1][1]
dirty = [(o, n) for o, n, flags in extents if flags & 1]
mode = "r+b" if os.path.exists(target) else "w+b"
with open(target, mode) as f:
    f.truncate(size)
    for o, n in dirty:
        n = min(n, size - o)
        f.seek(o)
        f.write(
            h.pread(n, o)
            if n <= 32 * 1024 * 1024
            else b"".join(h.pread(min(32 << 20, o + n - p), p) for p in range(o, o + n, 32 << 20))
        )
h.shutdown()
print(json.dumps(dirty))
