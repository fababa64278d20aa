"""The handshake (option) phase of one NBD connection around the protocol core: the exports
its peer may see, STARTTLS, the handshake deadline, and the set-up of transmission once the
core has negotiated an export."""

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exports.export import Export
from ..proto.server import Negotiated
from .access import Peer, subject_of
from .audit import ConnectionLog

if TYPE_CHECKING:
    from .server import NBDConnection


class AllowedExports:
    """The catalog as one connection may see it: exports its peer is not allowed to use are
    absent (not listed, unknown to GO/INFO/EXPORT_NAME), so their names are not revealed."""

    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        self._catalog = connection.server.catalog
        self._access = connection.policy.access

    def find_export(self, name: str) -> Export | None:
        export = self._catalog.find_export(name)
        if export is None:
            return None
        if not self._access.allowed(name, self._connection.peer):
            self._connection.denied(name)
            return None
        return export

    def list_exports(self) -> Sequence[Export]:
        peer = self._connection.peer
        return [e for e in self._catalog.list_exports() if self._access.allowed(e.name, peer)]


class HandshakePhase:
    def __init__(self, connection: "NBDConnection") -> None:
        self._connection = connection
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        connection = self._connection
        timeout = connection.policy.handshake_timeout
        if timeout > 0:
            self._timer = connection.loop.call_later(timeout, self._expired)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        connection = self._connection
        if connection.export is None and not connection.lost:
            connection.reason = (
                f"handshake not finished after {connection.policy.handshake_timeout:g} s "
                "(--handshake-timeout)"
            )
            connection.log.warning("%s, closing", connection.reason)
            connection.force_close()
            connection.connection_lost(None)

    def start_tls(self) -> None:
        connection = self._connection
        transport = connection.output.transport
        assert transport is not None
        flow = connection.flow
        flow.pause_for_tls(transport)
        task = connection.loop.create_task(self._upgrade(transport))
        flow.tasks.add(task)
        task.add_done_callback(flow.tasks.discard)

    async def _upgrade(self, raw: asyncio.Transport) -> None:
        connection = self._connection
        context = connection.policy.tls_context
        assert context is not None
        timeout = connection.policy.handshake_timeout or None
        try:
            transport = await connection.loop.start_tls(
                raw, connection, context, server_side=True, ssl_handshake_timeout=timeout
            )
        except asyncio.CancelledError:
            raw.abort()
            connection.connection_lost(None)
            raise
        except Exception as e:
            connection.reason = (
                connection.reason or f"TLS handshake failed: {e or type(e).__name__}"
            )
            connection.log.warning("%s", connection.reason)
            raw.abort()
            connection.connection_lost(e)
            return
        if connection.lost or transport is None:
            if transport is not None:
                transport.abort()
            return
        connection.output.transport = transport
        connection.flow.tls_established()
        connection.peer = Peer(
            connection.peer.address, subject_of(transport.get_extra_info("peercert"))
        )
        connection.log.debug("TLS established, subject %s", connection.peer.subject_text())
        connection.core.tls_established()
        if connection.closing:
            connection.close_when_idle()
            return
        connection.dispatcher.pump()

    def negotiated(self, event: Negotiated) -> None:
        """Transmission begins: the export, its contexts, how replies are written."""
        connection = self._connection
        self.stop()
        connection.start_idle_timer()
        export = connection.server.catalog.find_export(event.export.name)
        connection.export = export
        if export is not None:
            export.clients += 1
        contexts = [(c.id, c.name) for c in event.contexts]
        connection.status.negotiated(export, contexts, event.extended)
        peer = f"{connection.peer_text} {event.export.name}"
        connection.log = ConnectionLog(connection.log.logger, {"peer": peer})
        connection.log.debug(
            "transmission: structured=%s extended=%s tls=%s contexts=%s",
            event.structured,
            event.extended,
            connection.core.tls,
            [name for _, name in contexts],
        )
        connection.output.take_writes()
        connection.reads.upstream_wanted = export is not None and export.relays_reads
