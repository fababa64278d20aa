"""The bounds of one NBD connection's flow: requests in flight and the memory their replies
may hold. NBDConnection (net/server.py) stops reading from the client when they are reached."""

from ..proto.constants import Command
from ..proto.server import Request

# Requests served at once per connection; past this we stop reading from the client.
MAX_IN_FLIGHT = 64
# Reply bytes a connection may hold (reads in flight plus output not yet sent).
MAX_BUFFERED = 64 * 1024 * 1024
# What a block status reply may take, for that budget (2 MiB at most: 131072 extents).
BLOCK_STATUS_COST = 256 * 1024


def request_cost(request: Request) -> int:
    """Bytes of reply (or of a WRITE's payload) a request may hold in memory until it is
    answered."""
    if request.command == Command.READ or request.command == Command.WRITE:
        return request.length
    if request.command == Command.BLOCK_STATUS:
        return BLOCK_STATUS_COST
    return 0


def reading_full(busy: int, limit: int, reading_paused: bool) -> bool:
    """Too many requests in flight to read more. Reading stops at ``limit`` and starts again
    at half of it, so that a client that keeps the limit filled (nbdcopy: 64 requests a
    connection) does not flip reading off and on with every reply."""
    return busy >= (limit if not reading_paused else limit // 2 + 1)
