"""A small in-test catalog and a driver for nbdsrv.proto.server.ServerConnection."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nbdsrv.proto.errors import ProtocolError
from nbdsrv.proto.server import Event, ServerConnection

from . import spec

BITMAPS = ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1")
# Offered deliberately out of id order: ids must still follow QEMU's numbering.
DISK_CONTEXTS = ("qemu:dirty-bitmap:b0", "base:allocation", "qemu:allocation-depth", BITMAPS[1])
DISK_SIZE = 1 << 20


@dataclass(frozen=True)
class FakeExport:
    name: str
    description: str
    size: int
    contexts: tuple[str, ...]


class FakeCatalog:
    def __init__(self, *exports: FakeExport) -> None:
        self.exports = {e.name: e for e in exports}

    def find_export(self, name: str) -> FakeExport | None:
        return self.exports.get(name)

    def list_exports(self) -> Sequence[FakeExport]:
        return list(self.exports.values())


DISK = FakeExport("disk", "a test disk", DISK_SIZE, DISK_CONTEXTS)
PLAIN = FakeExport("plain", "", 4096, ("base:allocation",))


def make_catalog() -> FakeCatalog:
    return FakeCatalog(DISK, PLAIN)


@dataclass
class Outcome:
    """What a conversation produced: events, bytes sent, and the ProtocolError if any."""

    events: list[Event]
    output: bytes
    error: str | None


def feed(conn: ServerConnection, pieces: Iterable[bytes]) -> Outcome:
    """Feed ``pieces`` one receive call each; stop at the first ProtocolError."""
    events: list[Event] = []
    out = bytearray()
    error: str | None = None
    for piece in pieces:
        try:
            events += conn.receive(piece)
        except ProtocolError as e:
            error = str(e)
            out += conn.data_to_send()
            break
        out += conn.data_to_send()
    return Outcome(events, bytes(out), error)


def start(catalog: FakeCatalog | None = None, client_flags: int = 0x3) -> ServerConnection:
    """A connection past the greeting and client flags, its output drained."""
    conn = ServerConnection(catalog or make_catalog())
    conn.data_to_send()
    assert conn.receive(spec.u32(client_flags)) == []
    return conn


def negotiate(
    *,
    structured: bool = True,
    extended: bool = False,
    queries: tuple[str, ...] = ("base:allocation",),
    export: str = "disk",
    catalog: FakeCatalog | None = None,
) -> ServerConnection:
    """A connection in transmission on ``export``, its output drained."""
    conn = start(catalog)
    hello = b""
    if extended:
        hello += spec.option(spec.OPT_EXTENDED_HEADERS)
    elif structured:
        hello += spec.option(spec.OPT_STRUCTURED_REPLY)
    if structured or extended:
        hello += spec.option(spec.OPT_SET_META_CONTEXT, spec.meta_data(export, queries))
    hello += spec.option(spec.OPT_GO, spec.info_data(export))
    events = conn.receive(hello)
    assert len(events) == 1, events
    conn.data_to_send()
    return conn
