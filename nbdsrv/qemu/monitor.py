"""An asyncio QMP monitor for QEMU or qemu-storage-daemon, over a unix socket.

`Monitor` wraps `qemu.qmp.QMPClient` and adds what nbdsrv needs around it:

- every failure is one of our errors (`nbdsrv.qemu.errors`), one sentence for the user:
  `block-dirty-bitmap-add failed: Bitmap already exists: c1`, `query-block timed out after
  30s`, `QEMU at /run/vm.qmp went away`;
- events are kept (a bounded history, each with a sequence number) so that a caller can
  wait for an event that may already have arrived, and can subscribe to others
  (BLOCK_JOB_ERROR, BLOCK_EXPORT_DELETED, SHUTDOWN, ...);
- when the connection is lost, a supervisor task reconnects with growing delays, up to a
  cap, and then calls `on_reconnect` so the owner can reconcile its state with QEMU's.

Life of a connection::

    connect() ──► connected ──(EOF: QEMU died or restarted)──► on_disconnect(reason)
                      ▲                                             │
                      └── on_reconnect() ◄── retry: 0.1s, 0.2s, ... up to backoff_max
    close() ends it all; connect() may be called again afterwards.

A QEMU monitor serves one client at a time: a second client's connection is accepted by
the kernel but gets no greeting until the first one leaves. `connect` therefore bounds
each attempt and says so when QEMU does not answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, StateError
from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from ..together import all_of
from .errors import (
    EventTimeoutError,
    QEMUError,
    QEMUGoneError,
    QEMUUnreachableError,
    QMPError,
    QMPTimeoutError,
)

log = logging.getLogger(__name__)

# Seconds before the second attempt of connect(); each later one waits twice as long.
FIRST_CONNECT_RETRY = 0.005

EventPredicate = Callable[["QMPEvent"], bool]
EventCallback = Callable[["QMPEvent"], object]
"""Called for each matching event; may be a coroutine function (then run as a task)."""
ReconnectCallback = Callable[[], object]
"""Called after a lost connection is back; may be a coroutine function."""
DisconnectCallback = Callable[[str], object]
"""Called with a short reason when the connection is lost; may be a coroutine function."""


@dataclass(frozen=True)
class QMPEvent:
    """One QMP event. `seq` grows by one per event received by this Monitor."""

    seq: int
    name: str
    data: Mapping[str, Any]
    timestamp: float
    """QEMU's timestamp, seconds since the epoch (0.0 if QEMU gave none)."""


@dataclass
class _Subscription:
    names: frozenset[str]
    callback: EventCallback


@dataclass
class _Waiter:
    names: frozenset[str]
    predicate: EventPredicate | None
    future: asyncio.Future[QMPEvent]


class _Recorder(EventListener):
    """A listener that hands every event to the Monitor and queues none.

    qemu.qmp calls `accept` in its reader task, for each event in the order QEMU sent them,
    before the replies that follow; saying no keeps the event out of this listener's queue
    and its history (both unbounded).
    """

    def __init__(self, sink: Callable[[Message], None]) -> None:
        super().__init__()
        self._sink = sink

    def accept(self, event: Message) -> bool:
        self._sink(event)
        return False


class _Client(QMPClient):
    """QMPClient that formats a message for its debug log only when that log is on.

    qemu.qmp pretty-prints every message in and out (``json.dumps(indent=2)``, the pure
    Python encoder) before calling ``logger.debug``, whatever the level: for the answers of
    ``query-named-block-nodes`` a tenth of the daemon's CPU in a backup begin."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


def _deaf(event: Message) -> bool:
    return False


def transaction_command(
    actions: Sequence[tuple[str, Mapping[str, object]]],
) -> tuple[str, dict[str, object]]:
    """The QMP `transaction` of `actions`, a list of `(type, data)`, as `(command,
    arguments)` (for `Monitor.execute_many`)."""
    return "transaction", {
        "actions": [{"type": kind, "data": dict(data)} for kind, data in actions]
    }


def raise_first_error(results: Sequence[Any]) -> None:
    """Raise the first `QMPError` among the results of `Monitor.execute_many`, if any."""
    for result in results:
        if isinstance(result, QMPError):
            raise result


class Monitor:
    """A QMP connection to one QEMU (or qemu-storage-daemon) through a unix socket path.

    Usage::

        monitor = Monitor("/run/vm.qmp", on_reconnect=reconcile)
        await monitor.connect(timeout=10)
        await monitor.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "c1"})
        seq = monitor.last_seq
        await monitor.execute("block-export-del", {"id": "e0"})
        await monitor.wait_event("BLOCK_EXPORT_DELETED", lambda e: e.data["id"] == "e0",
                                 after=seq)
        await monitor.close()

    `reconnect=False` makes a lost connection final (`execute` then raises
    `QEMUGoneError` until `connect` is called again).
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        reconnect: bool = True,
        on_reconnect: ReconnectCallback | None = None,
        on_disconnect: DisconnectCallback | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        attempt_timeout: float = 5.0,
        history: int = 256,
    ) -> None:
        self._path = str(path)
        self._name = name
        self.reconnect = reconnect
        self.on_reconnect = on_reconnect
        self.on_disconnect = on_disconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.attempt_timeout = attempt_timeout
        self._client: QMPClient | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connected_event: asyncio.Event | None = None
        self._closing = False
        self._seq = 0
        self._history: collections.deque[QMPEvent] = collections.deque(maxlen=history)
        self._subscriptions: list[_Subscription] = []
        self._waiters: list[_Waiter] = []
        self._callback_tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Monitor {self._path} {state}>"

    # ------------------------------------------------------------------ state

    @property
    def path(self) -> str:
        """The QMP unix socket path."""
        return self._path

    @property
    def connected(self) -> bool:
        """True while a QMP session is up."""
        client = self._client
        return client is not None and client.runstate == Runstate.RUNNING

    @property
    def reconnecting(self) -> bool:
        """True while the supervisor is trying to get a lost connection back."""
        return self._client is None and self._supervisor is not None

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest event received so far (0 before any)."""
        return self._seq

    def _event(self) -> asyncio.Event:
        if self._connected_event is None:
            self._connected_event = asyncio.Event()
        return self._connected_event

    # ------------------------------------------------------------ connecting

    async def connect(self, timeout: float = 0.0) -> None:
        """Connect, retrying for up to `timeout` seconds (0: a single attempt).

        Returns at once when already connected; while the supervisor is reconnecting,
        waits for it instead. Raises `QEMUUnreachableError` when no session could be made.
        """
        if self.connected:
            return
        self._closing = False
        if self.reconnecting:
            await self.wait_connected(timeout)
            return
        deadline = time.monotonic() + timeout
        # A QEMU started a moment ago has its socket up within milliseconds: a first retry
        # at backoff_initial (0.1 s) would add that to every start.
        delay = min(FIRST_CONNECT_RETRY, self.backoff_initial)
        while True:
            try:
                client = await self._open()
                break
            except QEMUUnreachableError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, self.backoff_max)
        self._attach(client)
        self._supervisor = asyncio.create_task(
            self._supervise(client), name=f"qmp-supervisor {self._path}"
        )

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected; raise `QEMUGoneError` if that takes longer than `timeout`."""
        if self.connected:
            return
        if self._supervisor is None:
            raise QEMUGoneError(self._path, "not connected")
        try:
            async with asyncio.timeout(timeout):
                await self._event().wait()
        except TimeoutError:
            raise QEMUGoneError(self._path, f"not back after {timeout:g}s") from None

    async def close(self) -> None:
        """Disconnect for good: stop reconnecting, fail waiters, end the session."""
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        client, self._client = self._client, None
        self._event().clear()
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()
        self._fail_waiters(QEMUGoneError(self._path, "monitor closed"))

    async def _open(self) -> QMPClient:
        """One connection attempt: socket, greeting, capabilities negotiation."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # Our own connect, so that "nothing there" costs no error log in qemu.qmp.
            await loop.sock_connect(sock, self._path)
        except OSError as e:
            sock.close()
            raise QEMUUnreachableError(self._path, e.strerror or str(e)) from None
        client = _Client(self._name)
        # The stock all-events listener cannot be removed, and would queue every event for
        # good: a filter that refuses all makes it keep nothing.
        client.events.event_filter = _deaf
        client.register_listener(_Recorder(self._on_message))
        try:
            async with asyncio.timeout(self.attempt_timeout):
                await client.connect(sock)
        except TimeoutError:
            sock.close()
            raise QEMUUnreachableError(
                self._path,
                f"no QMP greeting within {self.attempt_timeout:g}s "
                "(is another client connected to this monitor?)",
            ) from None
        except _LibQMPError as e:
            sock.close()
            raise QEMUUnreachableError(self._path, str(e)) from None
        return client

    def _attach(self, client: QMPClient) -> None:
        self._client = client
        self._event().set()
        log.debug("QMP connected to %s", self._path)

    async def _supervise(self, client: QMPClient) -> None:
        """Notice a lost session; reconnect with backoff when allowed."""
        while True:
            while client.runstate == Runstate.RUNNING:
                await client.runstate_changed()
            reason = "connection closed"
            try:
                await client.disconnect()
            except Exception as e:
                reason = str(e) or type(e).__name__
            if self._closing:
                return
            self._client = None
            self._event().clear()
            log.warning("QMP connection to %s lost: %s", self._path, reason)
            self._fail_waiters(QEMUGoneError(self._path, reason))
            if self.on_disconnect is not None:
                self._call(self.on_disconnect, reason)
            if not self.reconnect:
                self._supervisor = None
                return
            delay = self.backoff_initial
            while True:
                await asyncio.sleep(delay)
                try:
                    client = await self._open()
                    break
                except QEMUUnreachableError as e:
                    log.debug("QMP reconnect to %s: %s", self._path, e)
                    delay = min(delay * 2, self.backoff_max)
            self._attach(client)
            log.info("QMP connection to %s is back", self._path)
            if self.on_reconnect is not None:
                self._call(self.on_reconnect)

    # ------------------------------------------------------------- commands

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 30.0
    ) -> Any:
        """Run one QMP command and return its result (usually a dict or a list).

        Raises `QMPError` ("CMD failed: QEMU's text") when QEMU refuses it,
        `QMPTimeoutError` when QEMU does not answer within `timeout` seconds (it may still
        carry the command out), `QEMUGoneError` when there is no connection or it is lost
        before the answer (the command may or may not have happened: query QEMU).
        """
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise QEMUGoneError(self._path, f"not connected, cannot run {command}")
        log.debug("QMP %s %s %s", self._path, command, arguments)
        try:
            async with asyncio.timeout(timeout):
                return await client.execute(command, arguments)
        except TimeoutError:
            raise QMPTimeoutError(command, timeout) from None
        except ExecuteError as e:
            raise QMPError(command, str(e), e.error_class) from None
        except (ExecInterruptedError, StateError) as e:
            raise QEMUGoneError(self._path, f"during {command}") from e
        except _LibQMPError as e:
            raise QEMUError(f"{command} failed: {e}") from e

    async def execute_many(
        self,
        commands: Sequence[tuple[str, Mapping[str, object] | None]],
        timeout: float = 30.0,
    ) -> list[Any]:
        """Run `commands` in this order, each sent without waiting for the answer of the one
        before (one round trip for all, not one each); each one's result, or the `QMPError`
        for one QEMU refused (the commands after it still run: make each one's failure
        harmless, or follow it with nothing that depends on it).

        QEMU runs one monitor's commands one at a time, in the order received. They are
        sent in this order because each task below puts its message on qemu.qmp's unbounded
        outgoing queue before it first waits, and tasks first run in the order created.
        A timeout or a lost connection raises as for `execute` (the other commands are
        then no longer waited for)."""

        async def one(command: str, arguments: Mapping[str, object] | None) -> Any:
            try:
                return await self.execute(command, arguments, timeout=timeout)
            except QMPError as e:
                return e

        return await all_of(*(one(c, a) for c, a in commands))

    async def transaction(
        self,
        actions: Sequence[tuple[str, Mapping[str, object]]],
        *,
        timeout: float = 30.0,
    ) -> None:
        """Run `actions`, a list of `(type, data)`, as one atomic QMP `transaction`.
        Errors as for `execute`, named "transaction"."""
        await self.execute(*transaction_command(actions), timeout=timeout)

    # --------------------------------------------------------------- events

    def subscribe(self, names: str | Iterable[str], callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event)` for every future event named in `names`.

        Returns a function that unsubscribes. Exceptions in callbacks are logged, never
        raised into the connection.
        """
        subscription = _Subscription(
            frozenset([names] if isinstance(names, str) else names), callback
        )
        self._subscriptions.append(subscription)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscriptions.remove(subscription)

        return unsubscribe

    def events(self, name: str | None = None, *, after: int = 0) -> list[QMPEvent]:
        """Events kept in the history (oldest first), optionally by name and after a seq."""
        return [e for e in self._history if e.seq > after and (name is None or e.name == name)]

    async def wait_event(
        self,
        name: str | Iterable[str],
        predicate: EventPredicate | None = None,
        timeout: float = 30.0,
        *,
        after: int | None = None,
    ) -> QMPEvent:
        """Wait for an event named `name` (or any of several names) for which `predicate`
        (if given) is true.

        With `after=SEQ` (take it from `last_seq` before running the command that causes
        the event) an event already in the history newer than SEQ is returned at once, so
        a fast event is never missed. Raises `EventTimeoutError` after `timeout` seconds,
        `QEMUGoneError` when the connection is lost meanwhile.
        """
        names = frozenset([name] if isinstance(name, str) else name)
        if after is not None:
            for event in self.events(after=after):
                if event.name in names and (predicate is None or predicate(event)):
                    return event
        future: asyncio.Future[QMPEvent] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(names, predicate, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise EventTimeoutError(" or ".join(sorted(names)), timeout) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def wait_until(
        self,
        check: Callable[[], Awaitable[bool]],
        names: str | Iterable[str],
        predicate: EventPredicate | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Run `check()` (usually one query) until it is true, again after each event named
        in `names` that `predicate` accepts: waiting on QEMU's word, not polling.

        `last_seq` is taken before each check, so an event that comes while the query runs
        is found in the history. `check` may raise to give up. Raises `EventTimeoutError`
        after `timeout` seconds, `QEMUGoneError` when the connection is lost meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seq = self.last_seq
            if await check():
                return
            try:
                await self.wait_event(names, predicate, deadline - loop.time(), after=seq)
            except EventTimeoutError:
                label = names if isinstance(names, str) else " or ".join(sorted(names))
                raise EventTimeoutError(label, timeout) from None

    def _on_message(self, msg: Message) -> None:
        """Runs in qemu.qmp's reader task for every event: never raise from here."""
        stamp = msg.get("timestamp")
        timestamp = 0.0
        if isinstance(stamp, dict):
            with contextlib.suppress(TypeError, ValueError):
                timestamp = (
                    float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
                )
        data = msg.get("data")
        self._seq += 1
        event = QMPEvent(
            self._seq, str(msg["event"]), data if isinstance(data, dict) else {}, timestamp
        )
        self._history.append(event)
        log.debug("QMP event from %s: %s %s", self._path, event.name, event.data)
        for waiter in list(self._waiters):
            if waiter.future.done() or event.name not in waiter.names:
                continue
            try:
                if waiter.predicate is None or waiter.predicate(event):
                    waiter.future.set_result(event)
            except Exception as e:
                waiter.future.set_exception(e)
        for subscription in list(self._subscriptions):
            if event.name in subscription.names:
                self._call(subscription.callback, event)

    def _fail_waiters(self, error: Exception) -> None:
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _call(self, callback: Callable[..., object], *args: object) -> None:
        """Run a user callback (plain or coroutine); log its failures."""
        try:
            result = callback(*args)
        except Exception:
            log.exception("callback %r failed", callback)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(_logged(result, callback))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)


async def _logged(awaitable: Awaitable[object], callback: object) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("callback %r failed", callback)
