"""Copy the dirty extents of a dirty-bitmap context from one NBD export into another, as a
backup tool writes an incremental into a qcow2 overlay (served writable by qemu-nbd).

Run with Debian's /usr/bin/python3 (python3-libnbd):
    copy_dirty_to_nbd.py SOURCE_URI CONTEXT TARGET_URI
Prints the dirty (offset, length) extents as JSON. Only dirty ranges are read and written.
"""

import json
import sys

import nbd

CHUNK = 4 << 20
MAX_STATUS = (1 << 32) - (1 << 20)

source_uri, context, target_uri = sys.argv[1:4]
source = nbd.NBD()
source.add_meta_context(context)
source.connect_uri(source_uri)
if not source.can_meta_context(context):
    sys.exit(f"the source does not offer {context}")
target = nbd.NBD()
target.connect_uri(target_uri)
size = source.get_size()
if target.get_size() != size:
    sys.exit(f"the target is {target.get_size()} bytes, the source {size}")

extents: list[tuple[int, int, int]] = []


def collect(meta: str, offset: int, entries: list[int], err: int) -> int:
    if meta == context:
        position = offset
        for i in range(0, len(entries), 2):
            extents.append((position, entries[i], entries[i + 1]))
            position += entries[i]
    return 0


offset = 0
while offset < size:
    source.block_status(min(size - offset, MAX_STATUS), offset, collect)
    offset = extents[-1][0] + extents[-1][1]
dirty = [(o, min(n, size - o)) for o, n, flags in extents if flags & 1]
for start, length in dirty:
    for position in range(start, start + length, CHUNK):
        n = min(CHUNK, start + length - position)
        target.pwrite(source.pread(n, position), position)
target.flush()
target.shutdown()
source.shutdown()
print(json.dumps(dirty))
