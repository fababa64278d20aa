"""One libvirt connection (``--libvirt URI``) used from asyncio.

libvirt's Python binding is blocking: every call runs in a small thread pool (the binding
releases the GIL, and a ``virConnect`` may be used from several threads). Domain events come
from libvirt's default event loop, run by one thread per process, and are handed to the
asyncio loop with ``call_soon_threadsafe``. When libvirtd goes away (restart, crash) the
connection reconnects in the background; QEMU and its backup jobs keep running meanwhile.

The binding is Debian's python3-libvirt, loaded from dist-packages only when ``--libvirt``
is used (it is built for the same Python 3.11 ABI as the project's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from ...errors import ConfigError, NbdsrvError

log = logging.getLogger(__name__)

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
RECONNECT_INTERVAL = 1.0
# libvirtd that stops answering: 3 keepalive probes 5 s apart, then the connection closes.
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3
CALL_THREADS = 4

T = TypeVar("T")

_binding: ModuleType | None = None
_binding_lock = threading.Lock()


def binding() -> ModuleType:
    """The ``libvirt`` module, with libvirt's default event loop running in a thread."""
    global _binding
    with _binding_lock:
        if _binding is None:
            if DIST_PACKAGES not in sys.path:
                # Appended: the venv's own packages keep precedence.
                sys.path.append(DIST_PACKAGES)
            try:
                import libvirt
            except ImportError as e:
                raise ConfigError(
                    f"--libvirt needs libvirt's Python binding ({e}): install python3-libvirt "
                    "(`make deps` does)"
                ) from e
            # Errors come as exceptions; libvirt would also print each on stderr.
            libvirt.registerErrorHandler(lambda *_: None, None)
            # Must precede the first connection so that it can deliver events.
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(
                target=_run_events, args=(libvirt,), name="libvirt-events", daemon=True
            ).start()
            _binding = libvirt
        return _binding


def _run_events(libvirt: Any) -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


class LibvirtError(NbdsrvError):
    """libvirt refused or failed a call; ``libvirt_code`` is libvirt's ``VIR_ERR_*`` number."""

    code = "libvirt"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.libvirt_code = code


class NotConnectedError(LibvirtError):
    code = "libvirt-not-connected"


@dataclass(frozen=True)
class DomainEvent:
    """A libvirt domain event, as the asyncio side sees it."""

    domain: str
    kind: str
    """``lifecycle`` or ``job-completed``."""
    event: int = 0
    detail: int = 0
    params: dict[str, Any] = field(default_factory=dict)


class LibvirtConnection:
    """``qemu:///system`` or any other URI, connected or reconnecting."""

    def __init__(
        self,
        uri: str,
        on_event: Callable[[DomainEvent], None],
        on_connected: Callable[[], Awaitable[None]],
    ) -> None:
        self.uri = uri
        self.libvirt = binding()
        self.on_event = on_event
        self.on_connected = on_connected
        self.conn: Any = None
        self.failure: str | None = None
        self._executor = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="libvirt-call")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callbacks: list[int] = []
        self._reconnect: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def connected(self) -> bool:
        return self.conn is not None

    async def start(self) -> None:
        """Connect now, or keep trying in the background."""
        self._loop = asyncio.get_running_loop()
        if not await self._connect():
            self._reconnect = asyncio.create_task(self._reconnect_loop())

    async def stop(self) -> None:
        self._stopping = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        conn, self.conn = self.conn, None
        if conn is not None:
            await self._run(self._close, conn)
        self._executor.shutdown(wait=False)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking binding call; libvirt's errors become :class:`LibvirtError`."""
        if self.conn is None:
            raise NotConnectedError(f"libvirt {self.uri} is not connected: {self.failure}")
        return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except self.libvirt.libvirtError as e:
            raise LibvirtError(f"libvirt: {e}", e.get_error_code()) from e

    # -- connecting ---------------------------------------------------------------------------

    async def _connect(self) -> bool:
        try:
            conn = await self._run(self._open)
        except LibvirtError as e:
            if self.failure != str(e):
                log.warning("libvirt %s: cannot connect: %s", self.uri, e)
            self.failure = str(e)
            return False
        self.conn = conn
        self.failure = None
        log.info("libvirt %s: connected", self.uri)
        await self.on_connected()
        return True

    def _open(self) -> Any:
        libvirt = self.libvirt
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._closed, None)
            self._callbacks = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._job_completed, None
                ),
            ]
        except BaseException:
            conn.close()
            raise
        return conn

    def _close(self, conn: Any) -> None:
        with contextlib.suppress(self.libvirt.libvirtError):
            for callback in self._callbacks:
                conn.domainEventDeregisterAny(callback)
            conn.unregisterCloseCallback()
        with contextlib.suppress(self.libvirt.libvirtError):
            conn.close()

    async def _reconnect_loop(self) -> None:
        while not self._stopping and not await self._connect():
            await asyncio.sleep(RECONNECT_INTERVAL)
        self._reconnect = None

    def _lost(self, conn: Any, reason: int) -> None:
        if self._stopping or conn is not self.conn:
            return
        self.conn = None
        self.failure = f"connection to libvirtd closed (reason {reason})"
        log.warning("libvirt %s: %s; reconnecting", self.uri, self.failure)
        self._executor.submit(self._close, conn)
        if self._reconnect is None:
            self._reconnect = asyncio.create_task(self._reconnect_loop())

    # -- libvirt's event thread ---------------------------------------------------------------

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _closed(self, conn: Any, reason: int, _opaque: Any) -> None:
        self._deliver(self._lost, conn, reason)

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self._deliver(self.on_event, DomainEvent(dom.name(), "lifecycle", event, detail))

    def _job_completed(self, _conn: Any, dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        self._deliver(self.on_event, DomainEvent(dom.name(), "job-completed", params=params))
