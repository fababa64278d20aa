"""A live restore's parallel prefetch: many NBD_CMD_CACHE requests in flight on a QEMU
export of the restore's image node, so the copy from the source is not one chunk at a time.

QEMU's NBD server answers CACHE with a copy-on-read prefetch (``blk_co_preadv`` with
``BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH``): each range not yet allocated in the image is
read from its backing (the source) and written into the image, and no data comes back. A
copy-on-read request is serialized with overlapping writes (QEMU makes it a serialising
request over whole clusters, and checks what is allocated once it is) exactly like the
copy-on-read of ``block-stream``: a client's write is never overwritten with source data.

The prefetch has a read-only export of its own ("rs-ID-pf") on the image node, added after
``block-stream`` started: block-stream puts its copy-on-read filter above the image node
and moves every parent there then (the client's export too), and a CACHE through that
filter copies each block twice (the filter's copy-on-read under the request's own); the
image node's own serialization still orders it with the client's writes, which reach the
image node through the filter.

The prefetch goes from the end of the image towards its start while ``block-stream`` goes
from the start: they meet once, somewhere in the middle, instead of queueing behind each
other's copy-on-read of the same clusters all the way (1 GiB from qemu-nbd into a new image in
a bare qemu-storage-daemon: 0.98 s from the end, 1.27 s from the start, ``qemu-img convert``
0.94-1.1 s; docs/performance.md).

``block-stream`` stays the authority: it runs at the same time, skips what the prefetch has
copied, copies whatever is left, stops and resumes on errors, and drops the backing link at
the end. The prefetch is only an accelerator: when a CACHE fails (the source is unreachable)
it backs off and tries that range again later, and it stops when the session stops
streaming. Nothing it does can make the image wrong by content.
"""

import asyncio
import contextlib
import logging
from collections import deque

from ..net.address import Address
from ..net.client import NBDClient
from ..proto.errors import NBDError
from ..qemu.errors import QEMUError
from ..qemu.monitor import Monitor
from .target import remove_export

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Bytes of one CACHE request, and CACHE requests in flight on the one connection (QEMU's NBD
# server reads no more than 16 requests ahead; its nbd client keeps 16 in flight to the
# source). Measured on 1 GiB (docs/performance.md): 64 KiB to 8 MiB, 4 to 32 deep; 256 KiB
# by 16 was the fastest, 1 MiB and more slower.
PREFETCH_CHUNK = 256 * 1024
PREFETCH_DEPTH = 16
# Seconds before a failed prefetch tries again (doubling up to BACKOFF_MAX).
BACKOFF_FIRST = 2.0
BACKOFF_MAX = 30.0


class Prefetch:
    """Prefetch every chunk of the image node ``node`` (``size`` bytes), from the start to
    the end, through a QEMU export named ``export`` on ``address``."""

    def __init__(
        self,
        monitor: Monitor,
        node: str,
        address: Address,
        export: str,
        size: int,
        *,
        chunk: int = PREFETCH_CHUNK,
        depth: int = PREFETCH_DEPTH,
    ) -> None:
        self.monitor = monitor
        self.node = node
        self.address = address
        self.export = export
        self.size = size
        self.chunk = chunk
        self.depth = max(1, depth)
        # Chunk starts still to prefetch, taken from the right (the end of the image).
        self._todo: deque[int] = deque(range(0, size, chunk))
        # Chunks whose CACHE succeeded (copied into the image, or written there by a client):
        # all of them from _suffix to the end, and those below it by their starts (the few
        # that completed ahead of a slower neighbour).
        self._suffix = size
        self._below: set[int] = set()
        # block-stream's offset as last seen (copied): chunks below it are its own.
        self._streamed = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def copied(self, copied_below: int) -> int:
        """Bytes known to be in the image: those below ``copied_below`` (block-stream's
        offset) together with every chunk the prefetch completed above it."""
        self._streamed = max(self._streamed, copied_below)
        if copied_below >= self._suffix:
            return self.size
        done = copied_below + (self.size - self._suffix)
        done += sum(
            min(start + self.chunk, self._suffix) - max(start, copied_below)
            for start in self._below
            if start + self.chunk > copied_below
        )
        return min(self.size, done)

    async def start(self) -> bool:
        """Add the export and start; False (block-stream copies alone) if QEMU refuses."""
        try:
            await self.monitor.execute(
                "block-export-add",
                {"type": "nbd", "id": self.export, "node-name": self.node, "name": self.export},
            )
        except QEMUError as e:
            log.warning("no prefetch for %s: %s", self.node, e)
            return False
        self._task = asyncio.create_task(self._run(), name=f"restore-prefetch {self.export}")
        return True

    async def stop(self) -> None:
        """Stop, and take the export away."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(QEMUError):
            await remove_export(self.monitor, self.export)

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while self._todo:
            try:
                await self._pass()
            except (NBDError, OSError) as e:
                self.failures += 1
                log.info("prefetch of %s stopped (%s); again in %.0f s", self.export, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _pass(self) -> None:
        """One connection, ``depth`` workers taking chunks (from the end) until none is left;
        a chunk whose CACHE failed is the next to be taken again."""
        client = await NBDClient.connect(self.address, self.export)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.depth):
                    group.create_task(self._worker(client))
        except BaseExceptionGroup as group_error:
            # The first error tells why; the others are its echoes on the same connection.
            first = group_error.exceptions[0]
            if isinstance(first, (NBDError, OSError)):
                raise first from None
            raise
        finally:
            client.abort()

    async def _worker(self, client: NBDClient) -> None:
        while self._todo:
            start = self._todo.pop()
            if start + self.chunk <= self._streamed:
                # The prefetch met block-stream: everything left is behind the stream.
                self._todo.clear()
                return
            try:
                await client.cache(start, min(self.chunk, self.size - start))
            except BaseException:
                self._todo.append(start)
                raise
            self._below.add(start)
            while self._suffix > 0:
                next_down = (self._suffix - 1) // self.chunk * self.chunk
                if next_down not in self._below:
                    break
                self._below.remove(next_down)
                self._suffix = next_down
