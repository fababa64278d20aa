"""A typed client for nbdsrv's control protocol (docs/api.md), blocking and asyncio.

    from nbdsrv.client import Client

    with Client("nbdsrv+tls://host1:10810", "/etc/pki/nbdsrv") as daemon:
        for vm in daemon.status()["vms"]:
            session = daemon.backup_begin(vm["name"])
            ...
            daemon.backup_end(vm["name"], session["id"])

``Client()`` with no address talks to the local daemon (``$NBDSRV_CONNECT``, else
``$NBDSRV_CONTROL``, else the default control socket), as the CLI does — the CLI itself uses
this client. One method per operation, typed results (results.py); every failure is a
``ControlError`` whose ``code`` is the daemon's stable error code (``not-found``,
``session``, …) or ``control`` when the daemon could not be reached. Only the standard
library is needed (``ssl`` is loaded for remote daemons only).
"""

from typing import TYPE_CHECKING, Any

from ..errors import ControlError
from .sync import Client

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .endpoint import Endpoint
    from .results import (
        Checkpoint,
        CheckpointCreated,
        CheckpointDeleted,
        Hello,
        Session,
        SessionDisk,
        SessionEnded,
        SnapshotCommitted,
        SnapshotCreated,
        Status,
    )

# Loaded when first used: a CLI command needs only Client (asyncio and the TypedDicts cost
# start-up time).
_LAZY = {"AsyncClient": "aio", "Endpoint": "endpoint"}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY.get(name, 'results')}", __name__)
    return getattr(module, name)


__all__ = [
    "AsyncClient",
    "Checkpoint",
    "CheckpointCreated",
    "CheckpointDeleted",
    "Client",
    "ControlError",
    "Endpoint",
    "Hello",
    "Session",
    "SessionDisk",
    "SessionEnded",
    "SnapshotCommitted",
    "SnapshotCreated",
    "Status",
]
