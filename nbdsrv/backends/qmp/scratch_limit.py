"""--scratch-limit as a cap: QEMU says when a session's scratch crosses it (events, not
polls).

The limit holds for the session's scratch images together. Each disk's scratch file node
gets a write threshold at its end of file plus its share of what is left of the limit::

    threshold(disk) = size(disk's scratch file) + (limit - used) / disks

QEMU sends BLOCK_WRITE_THRESHOLD as a write goes past one (and disarms it); nbdsrv then
measures: past the limit the session breaks (its filters leave the guest's path and the
scratch files go at once), else every threshold is armed again with the smaller rest.
The scratch thus holds at most the limit plus the writes in flight when QEMU told. A poll
every SAFETY_POLL seconds is only the safety net (an event lost with a reconnect).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from ...qemu import fleece
from ...qemu.errors import QEMUError
from ...qemu.monitor import Monitor, QMPEvent, raise_first_error

log = logging.getLogger(__name__)

SAFETY_POLL = 2.0
EVENT = "BLOCK_WRITE_THRESHOLD"


def allocated(path: str) -> int:
    """Bytes a scratch image takes on disk (what copy-before-write stored, metadata too)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def end_of_file(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class ScratchLimit:
    """Watches one session's scratch against ``limit``; ``on_exceeded(reason)`` once."""

    def __init__(
        self,
        monitor: Monitor,
        plan: fleece.FleecePlan,
        limit: int,
        on_exceeded: Callable[[str], None],
    ) -> None:
        self.monitor = monitor
        self.plan = plan
        self.limit = limit
        self.on_exceeded = on_exceeded
        self.nodes = {d.scratch_file_node: d.scratch_file for d in self.plan.disks}
        self.done = False
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def used(self) -> int:
        return sum(allocated(path) for path in self.nodes.values())

    async def start(self) -> None:
        self._unsubscribe = self.monitor.subscribe(EVENT, self._on_event)
        await self._check()
        self._spawn(self._poll())

    def stop(self) -> None:
        self.done = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, event: QMPEvent) -> None:
        if not self.done and event.data.get("node-name") in self.nodes:
            self._spawn(self._check())

    async def _poll(self) -> None:
        while not self.done:
            await asyncio.sleep(SAFETY_POLL)
            await self._check()

    async def _check(self) -> None:
        """Break past the limit, else arm every threshold with the rest of the limit."""
        if self.done:
            return
        used = self.used()
        if used > self.limit:
            self.stop()
            self.on_exceeded(f"scratch data {used} bytes passed --scratch-limit {self.limit}")
            return
        share = max((self.limit - used) // len(self.nodes), 1)
        thresholds = {node: end_of_file(path) + share for node, path in self.nodes.items()}
        try:
            raise_first_error(
                await self.monitor.execute_many(fleece.write_threshold_commands(thresholds))
            )
        except QEMUError as e:
            # The nodes are gone (the session ends) or QEMU is: the poll stays the net.
            log.debug("session %s: write threshold not set: %s", self.plan.session, e)
