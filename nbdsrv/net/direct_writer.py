"""Replies written straight to a plain (non-TLS) client socket, bypassing the event loop's
transport, so that data can go from the page cache (``sendfile``) or from QEMU's socket
(``splice`` through a pipe) to the client without passing through nbdsrv's memory.

The transport still reads the client's requests; once the writer exists every reply goes
through it (writing through both would mix their bytes). It writes on a duplicate of the
socket's descriptor: what the socket takes at once is written at once; the rest is queued,
in order, and written when the socket becomes writable again.

Queue items are bytes-like buffers (kept by reference until sent: the caller must not change
them), :class:`FileRange` (sent with ``sendfile``) and :class:`PipeRange` (bytes waiting in a
pipe, sent with ``splice``). A *stream* (:meth:`open_stream`) lets one writer — the relay —
send a reply chunk in pieces as they arrive: whatever others write meanwhile waits until
the stream is closed, so no reply lands inside another.
"""

import asyncio
import errno
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..exports.export import FileRange

# Queued bytes at which the connection stops starting requests, and at which it starts again.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024
# Buffers per sendmsg (IOV_MAX is 1024 on Linux).
MAX_IOV = 512
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


class PipeRange(NamedTuple):
    """``length`` bytes waiting in a pipe (read end ``fd``), in order with every other
    PipeRange of that pipe."""

    fd: int
    length: int


Item = bytes | bytearray | memoryview | FileRange | PipeRange


def zero_copy_available() -> bool:
    """Whether this Python can sendfile and splice (Linux, Python ≥ 3.10)."""
    return hasattr(os, "sendfile") and hasattr(os, "splice")


class DirectWriter:
    """The output side of one client connection."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        # The queue is empty again after the socket was full or a stream held writes back
        # (a stream may be open still).
        on_drained: Callable[[], None],
        on_pressure: Callable[[bool], None],
        on_failed: Callable[[OSError], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self.fd = self._fd
        """The descriptor it writes on (a duplicate of the connection's socket)."""
        self._on_drained = on_drained
        self._on_pressure = on_pressure
        self._on_failed = on_failed
        self._queue: deque[Item] = deque()
        self._held: list[Item] | None = None  # written by others while a stream is open
        self._waiting = False  # for the socket to become writable
        self._owed = False  # on_drained, once the queue is empty
        self._pressure = False
        self.buffered = 0
        """Bytes queued, not yet taken by the socket (held ones included)."""
        self.pipe_bytes = 0
        """Bytes of queued PipeRanges (still in their pipe)."""
        self.closed = False

    @property
    def idle(self) -> bool:
        return not self._queue and self._held is None

    def write(self, items: Iterable[Item]) -> None:
        """Send ``items`` after everything written before (and after an open stream)."""
        if self.closed:
            return
        if self._held is not None:
            for item in items:
                self._held.append(item)
                self.buffered += _length(item)
            self._owed = True
            self._check_pressure()
            return
        self._enqueue(items)

    def send(self, data: bytes) -> None:
        """One buffer, as :meth:`write`: sent at once when nothing waits before it (a
        client that asks one thing at a time gets its answer with the fewest steps)."""
        if self._queue or self._held is not None or self._waiting or self.closed:
            self.write((data,))
            return
        try:
            n = self._sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.close()
            self._on_failed(e)
            return
        if n < len(data):
            self._enqueue((memoryview(data)[n:],))

    def open_stream(self) -> None:
        """From now until :meth:`close_stream`, only :meth:`stream` writes reach the socket."""
        assert self._held is None, "one stream at a time"
        self._held = []

    def stream(self, items: Iterable[Item]) -> None:
        """Part of the open stream."""
        assert self._held is not None
        if not self.closed:
            self._enqueue(items)

    def stream_pipe(self, fd: int, length: int) -> None:
        """Part of the open stream: ``length`` bytes waiting in the pipe ``fd``. Spliced at
        once when nothing is queued before them (the usual case, with fewer steps than
        :meth:`stream`)."""
        assert self._held is not None
        if self._queue or self._waiting or self.closed:
            self.stream([PipeRange(fd, length)])
            return
        try:
            n = os.splice(fd, self._fd, length, flags=SPLICE_FLAGS)
        except BlockingIOError:
            n = 0  # the socket is full: all of it waits
        except OSError as e:
            self.close()
            self._on_failed(e)
            return
        if n < length:
            self._enqueue((PipeRange(fd, length - n),))

    def close_stream(self) -> None:
        held, self._held = self._held, None
        if held and not self.closed:
            self.buffered -= sum(_length(item) for item in held)
            self._enqueue(held)
        elif not self._queue and not self.closed and self._owed:
            self._owed = False
            self._on_drained()

    def close(self) -> None:
        """Stop writing (what is queued is dropped) and let go of the socket."""
        if self.closed:
            return
        self.closed = True
        if self._waiting:
            self._loop.remove_writer(self._fd)
            self._waiting = False
        self._queue.clear()
        self._held = None
        self.buffered = self.pipe_bytes = 0
        self._sock.close()

    # -- internals --------------------------------------------------------------------------

    def _enqueue(self, items: Iterable[Item]) -> None:
        for item in items:
            n = _length(item)
            if not n:
                continue
            self._queue.append(item)
            self.buffered += n
            if type(item) is PipeRange:
                self.pipe_bytes += n
        if not self._waiting:
            self._send()
        if self._pressure or self.buffered > HIGH_WATER:
            self._check_pressure()

    def _send(self) -> None:
        """Write from the head of the queue until it is empty or the socket is full."""
        queue = self._queue
        try:
            while queue:
                item = queue[0]
                kind = type(item)
                if kind is FileRange:
                    assert isinstance(item, FileRange)
                    n = os.sendfile(self._fd, item.fd, item.offset, item.length)
                    if n == 0:
                        raise OSError(errno.EIO, "file ended before the range sent")
                    self.buffered -= n
                    if n < item.length:
                        queue[0] = FileRange(item.fd, item.offset + n, item.length - n)
                        break
                    queue.popleft()
                elif kind is PipeRange:
                    assert isinstance(item, PipeRange)
                    n = os.splice(item.fd, self._fd, item.length, flags=SPLICE_FLAGS)
                    if n == 0:  # never with the bytes accounted for: do not spin on it
                        raise OSError(errno.EIO, "the pipe held less than queued")
                    self.buffered -= n
                    self.pipe_bytes -= n
                    if n < item.length:
                        queue[0] = PipeRange(item.fd, item.length - n)
                        break
                    queue.popleft()
                elif not self._send_buffers():
                    break
        except BlockingIOError:
            pass
        except OSError as e:
            self.close()
            self._on_failed(e)
            return
        if queue:
            self._owed = True
            if not self._waiting:
                self._waiting = True
                self._loop.add_writer(self._fd, self._writable)
        elif self._owed:
            self._owed = False
            self._on_drained()  # held items may still wait: see idle

    def _send_buffers(self) -> bool:
        """One sendmsg of the buffers at the head of the queue; True when all went."""
        queue = self._queue
        buffers: list[bytes | bytearray | memoryview] = []
        for item in queue:
            if type(item) in (FileRange, PipeRange) or len(buffers) == MAX_IOV:
                break
            buffers.append(item)  # type: ignore[arg-type]
        # More is coming right behind (file or pipe data): let TCP put it in one segment.
        more = socket.MSG_MORE if len(buffers) < len(queue) else 0
        n = self._sock.sendmsg(buffers, (), more)
        self.buffered -= n
        for buffer in buffers:
            size = len(buffer)
            if n < size:
                if n:
                    queue[0] = memoryview(buffer)[n:]
                return False
            n -= size
            queue.popleft()
        return True

    def _writable(self) -> None:
        if self.closed:
            return
        self._waiting = False
        self._loop.remove_writer(self._fd)
        self._send()
        self._check_pressure()

    def _check_pressure(self) -> None:
        if not self._pressure and self.buffered > HIGH_WATER:
            self._pressure = True
            self._on_pressure(True)
        elif self._pressure and self.buffered <= LOW_WATER:
            self._pressure = False
            self._on_pressure(False)


def _length(item: Item) -> int:
    if isinstance(item, (FileRange, PipeRange)):
        return item.length
    return len(item)
