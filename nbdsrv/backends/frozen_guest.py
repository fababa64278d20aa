"""A guest that nbdsrv froze (``--quiesce``) and has not yet seen thawed.

::

    mark()  before the freeze           frozen.json in the VM's state directory
    clear() once the agent confirmed the thaw
    keep_thawing()                      the thaw not confirmed (an error, no answer, a
                                        daemon killed meanwhile): retry in the background,
                                        backing off, until the agent confirms, then clear()

The marker is what ``status`` reports as ``guest_frozen`` and what a restarted daemon finds:
a guest is never left frozen for good, whichever backend froze it (``--qmp`` through its
agent socket, libvirt through ``virDomainFSThaw``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..backup.store import read_json, remove_durably, write_json
from ..errors import NbdsrvError

log = logging.getLogger(__name__)

MARKER = "frozen.json"
# Seconds between thaw attempts: doubling from the first to the last.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0

Thaw = Callable[[], Awaitable[bool]]
"""One thaw attempt: True when the guest agent confirmed the guest is thawed."""


class GuestFrozenError(NbdsrvError):
    """The thaw was not confirmed: the guest may still be frozen (nbdsrv keeps retrying)."""

    code = "guest-frozen"


class FrozenGuest:
    """The frozen marker of one VM and the background retries of its thaw."""

    def __init__(self, vm_name: str, directory: str, thaw: Thaw) -> None:
        self.vm_name = vm_name
        self.path = os.path.join(directory, MARKER)
        self._thaw = thaw
        self._task: asyncio.Task[None] | None = None

    @property
    def frozen(self) -> bool:
        """True from before a freeze until a thaw is confirmed (what ``status`` shows)."""
        return os.path.exists(self.path)

    def mark(self, **info: Any) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        write_json(self.path, {"since": time.time(), **info})

    def info(self) -> dict[str, Any]:
        document = read_json(self.path)
        return document if isinstance(document, dict) else {}

    def clear(self) -> None:
        remove_durably(self.path)

    def not_thawed(self, detail: str) -> GuestFrozenError:
        """Start the retries; the error the command fails with."""
        self.keep_thawing()
        return GuestFrozenError(
            f"VM {self.vm_name}: the guest may still be frozen: its thaw was not confirmed "
            f"({detail}); nbdsrv retries until the guest agent confirms it (`nbdsrv status` "
            "shows guest_frozen)"
        )

    def keep_thawing(self) -> None:
        """Retry the thaw in the background until confirmed (once: a second call while the
        retries run does nothing)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        delay = RETRY_FIRST
        while self.frozen:
            try:
                confirmed = await self._thaw()
            except Exception as e:  # one failed attempt never ends the retries
                log.error("VM %s: thaw attempt failed: %s", self.vm_name, e)
                confirmed = False
            if confirmed:
                self.clear()
                log.warning("VM %s: the guest agent confirmed the thaw", self.vm_name)
                return
            log.error(
                "VM %s: the guest may still be frozen; next thaw attempt in %g s",
                self.vm_name,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def forget(self) -> None:
        """The guest is gone (its domain stopped): nothing is frozen any more."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.frozen:
            self.clear()

    async def stop(self) -> None:
        """Stop retrying (the marker stays: the next daemon goes on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
