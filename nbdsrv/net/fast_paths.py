"""What the fast paths of NBDConnection (net/server.py) need beside the protocol core:
block status answered at once from in-memory sources, and polling for the next request of
a client that asks one thing at a time."""

from ..exports.export import Export
from ..proto.extents import StatusSource

# Bytes read at once while polling (requests only: a few dozen a read).
POLL_READ = 64 * 1024
# Most answers that skip polling after windows that passed with nothing.
MAX_POLL_BACKOFF = 64
# Reads taken by polling before the event loop gets its turn (other connections, control
# requests): about 1 ms at most.
POLL_BURST = 16


def status_sources(
    export: Export, contexts: list[tuple[int, str]], extended: bool
) -> list[tuple[int, StatusSource]] | None:
    """What answers every negotiated context at once, if the export has that for each."""
    sources = []
    for cid, name in contexts:
        source = export.status_source(name, extended=extended)
        if source is None:
            return None
        sources.append((cid, source))
    return sources
