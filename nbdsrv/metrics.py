"""Prometheus metrics: ``--metrics tcp:HOST:PORT`` serves ``GET /metrics`` in the text format
(version 0.0.4). Off by default.

Counters and histograms live here and grow as the daemon works; gauges (sessions,
connections, checkpoints, QMP state) are read from the daemon at scrape time through
``collect``. The HTTP side is the least HTTP that a scraper needs: one request per
connection, GET of /metrics only (405 for other methods, 404 for other paths).

A scrape never waits on a VM: ``collect`` reads the daemon's own state (no VM lock, no QMP,
no libvirt call, no guest agent), so it is answered at once whatever QEMU or an agent does.
The endpoint can never take the daemon's descriptors from NBD and control clients: at most
MAX_CONNECTIONS are served at a time (more are closed at once), and one whose request head
does not arrive within HEAD_TIMEOUT, or whose answer is not taken within WRITE_TIMEOUT, is
closed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence

from .net.address import Address

log = logging.getLogger(__name__)

# Seconds: backup begin/end take tens of milliseconds to seconds.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_REQUEST_HEAD = 8192
# A scraper opens one connection per scrape; a few cover several scrapers at once.
MAX_CONNECTIONS = 8
HEAD_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]
"""(metric name, labels, value)."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Histogram:
    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def samples(self, name: str, labels: Labels) -> list[Sample]:
        out: list[Sample] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append((f"{name}_bucket", (*labels, ("le", f"{bound:g}")), running))
        out.append((f"{name}_bucket", (*labels, ("le", "+Inf")), self.count))
        out.append((f"{name}_sum", labels, self.total))
        out.append((f"{name}_count", labels, self.count))
        return out


class Metrics:
    """What the daemon counts while it runs."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.read_bytes: defaultdict[str, int] = defaultdict(int)
        self.durations: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.collect: Callable[[], Awaitable[Iterable[tuple[str, str, str, Sample]]]] | None = None
        """Gauges at scrape time: (name, type, help, sample) rows."""
        self._server: asyncio.Server | None = None
        self._open = 0
        self.refused = 0
        """Connections closed at once because MAX_CONNECTIONS were open."""

    def count_request(self, export: str, command: str, read_bytes: int) -> None:
        self.requests[(export, command)] += 1
        if read_bytes:
            self.read_bytes[export] += read_bytes

    def observe(self, operation: str, seconds: float) -> None:
        self.durations[operation].observe(seconds)

    async def render(self) -> str:
        families: dict[str, tuple[str, str, list[Sample]]] = {}

        def add(name: str, kind: str, text: str, sample: Sample) -> None:
            families.setdefault(name, (kind, text, []))[2].append(sample)

        for (export, command), count in sorted(self.requests.items()):
            add(
                "nbdsrv_requests_total",
                "counter",
                "NBD requests answered, per export and command.",
                ("nbdsrv_requests_total", (("export", export), ("command", command)), count),
            )
        for export, count in sorted(self.read_bytes.items()):
            vm, _, disk = export.partition("/")
            labels: Labels = (("export", export),)
            if disk:
                labels = (("vm", vm), ("disk", disk), *labels)
            add(
                "nbdsrv_read_bytes_total",
                "counter",
                "Bytes answered to READ requests, per export (VM and disk for sessions).",
                ("nbdsrv_read_bytes_total", labels, count),
            )
        for operation, histogram in sorted(self.durations.items()):
            name = f"nbdsrv_{operation}_duration_seconds"
            kind_text = f"Duration of {operation.replace('_', ' ')}, seconds."
            for sample in histogram.samples(name, ()):
                add(name, "histogram", kind_text, sample)
        add(
            "nbdsrv_metrics_connections_refused_total",
            "counter",
            "Metrics connections closed at once: the connection limit was reached.",
            ("nbdsrv_metrics_connections_refused_total", (), self.refused),
        )
        if self.collect is not None:
            for name, kind, text, sample in await self.collect():
                add(name, kind, text, sample)
        lines = []
        for name, (kind, text, samples) in families.items():
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for metric, labels, value in samples:
                number = f"{value:g}" if isinstance(value, float) else str(value)
                lines.append(f"{metric}{_labels(labels)} {number}")
        return "\n".join(lines) + "\n"

    # -- HTTP -----------------------------------------------------------------------------

    async def listen(self, address: Address) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            address.host or None,
            address.port,
            reuse_address=True,
            # A burst of connections waits in the kernel, not as descriptors of ours.
            backlog=MAX_CONNECTIONS,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            self.refused += 1
            writer.transport.abort()  # the descriptor is freed now
            return
        self._open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers: list[tuple[str, str]] = []
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_HEAD:
                raise ValueError("request head too long")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method != "GET":
                status, body, headers = 405, "method not allowed\n", [("Allow", "GET")]
            elif path.split("?", 1)[0] != "/metrics":
                status, body = 404, "not found: try /metrics\n"
            else:
                status, body = 200, await self.render()
                headers = [("Content-Type", "text/plain; version=0.0.4")]
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, body = 400, "bad request\n"
        except OSError as e:
            status, body = 0, str(e)
        try:
            if status:
                await _respond(writer, status, body, headers)
        except (OSError, TimeoutError) as e:
            log.debug("metrics client: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.wait_closed()
            writer.transport.abort()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: str,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    data = body.encode()
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in headers]
    head += ["Connection: close", "", ""]
    writer.write("\r\n".join(head).encode() + data)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()
