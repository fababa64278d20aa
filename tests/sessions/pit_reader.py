"""Read an export over and over and judge every read by content, as a backup tool's reads
would be judged: run with Debian's /usr/bin/python3 (python3-libnbd).

    pit_reader.py URI EXPECTED_FILE STOP_FILE READY_FILE

Reads 64 KiB at random offsets until STOP_FILE exists; every read must equal EXPECTED_FILE
(the disk at the point in time) at that offset or fail. READY_FILE is created after the
first good read. Prints JSON counts:
{"ok": N, "wrong": N, "errors": {"EIO": N, ...}}. A lost connection is reconnected.
"""

import errno
import json
import os
import random
import re
import sys
import time

import nbd

uri, expected_path, stop, ready = sys.argv[1:5]
with open(expected_path, "rb") as f:
    expected = f.read()
counts: dict[str, object] = {"ok": 0, "wrong": 0}
errors: dict[str, int] = {}
rng = random.Random(1)
h: nbd.NBD | None = None
while not os.path.exists(stop):
    try:
        if h is None:
            h = nbd.NBD()
            h.connect_uri(uri)
        offset = rng.randrange(0, len(expected) // 65536) * 65536
        data = h.pread(65536, offset)
        if data == expected[offset : offset + 65536]:
            counts["ok"] = int(counts["ok"]) + 1  # type: ignore[call-overload]
            if not os.path.exists(ready):
                open(ready, "w").close()
        else:
            counts["wrong"] = int(counts["wrong"]) + 1  # type: ignore[call-overload]
    except nbd.Error as e:
        found = re.search(r"\((E[A-Z]+)\)", str(e))
        # libnbd's message ends in the errno's name: "… Input/output error (EIO)".
        name = found[1] if found else errno.errorcode.get(e.errno or 0, "none")
        counts.setdefault("first_error", str(e))
        errors[name] = errors.get(name, 0) + 1
        if name != "EIO":
            h = None  # the connection is gone: connect again (the export may refuse)
            time.sleep(0.01)
counts["errors"] = errors
print(json.dumps(counts))
