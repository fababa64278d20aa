"""Which QEMU process is behind a monitor: a marker object that lives as long as the process.

QMP tells nothing that changes from one QEMU process to the next (the greeting shows the
version; a qemu-storage-daemon has no pid or uuid to query). So nbdsrv adds an inert object
to a process with a disk that cannot store bitmaps the first time it looks at it (QmpVM's
``block_state``) — ``object-add`` of a ``secret`` with an empty value and the id
``nbdsrv-qemu-<random>`` — and finds it under ``/objects`` afterwards: a marker still there
means the same process (nbdsrv restarted, QMP reconnected); a new process has none of the
markers of the old one.
Checked on QSD 7.2: ``/objects`` only exists once some object was added (``qom-list`` then
fails with "Device '/objects' not found").
"""

import uuid
from collections.abc import Sequence
from typing import Any

from .errors import QMPError
from .monitor import Monitor

PREFIX = "nbdsrv-qemu-"

# Sent with other queries in one round trip (Monitor.execute_many).
QUERY: tuple[str, dict[str, object]] = ("qom-list", {"path": "/objects"})


def markers_of(answer: Any) -> frozenset[str]:
    """The markers in the answer to QUERY (several when several daemons look at one
    process); none when QEMU refused it: then no object was ever added."""
    if isinstance(answer, QMPError) or not isinstance(answer, Sequence):
        return frozenset()
    return frozenset(
        str(entry["name"])
        for entry in answer
        if isinstance(entry, dict) and str(entry.get("name", "")).startswith(PREFIX)
    )


async def mark(monitor: Monitor) -> str:
    """Add a new marker to the process behind ``monitor``; its id."""
    marker = PREFIX + uuid.uuid4().hex[:16]
    await monitor.execute("object-add", {"qom-type": "secret", "id": marker, "data": ""})
    return marker
