"""Application-consistent points in time: the guest's filesystems frozen for the instant of
the QMP transaction, through the QEMU guest agent (``--qga VM=PATH``, ``--quiesce``).

::

    Quiescer.open()   connect + sync the agent   (no agent: fail here, nothing done yet)
        ... intents, scratch images ...
    async with q.frozen():                     marker file written, guest-fsfreeze-freeze
        transaction                            (the point in time)
                                               guest-fsfreeze-thaw, marker removed

The thaw is guaranteed: on every error path and on cancellation; a freeze that does not
answer within FREEZE_TIMEOUT is thawed and fails; and if the daemon dies while the guest is
frozen, the marker makes the next start (reconciliation) thaw it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from ...backup.store import read_json, remove_durably, write_json
from ...errors import NbdsrvError
from ...qemu.guest_agent import GuestAgent, GuestAgentError

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 10.0
THAW_TIMEOUT = 10.0


class QuiesceError(NbdsrvError):
    """--quiesce cannot be honoured; nothing was done."""

    code = "quiesce"


def _marker(directory: str) -> str:
    return os.path.join(directory, "frozen.json")


class Quiescer:
    """A guest agent connection held from the checks of an operation to its transaction."""

    def __init__(self, vm_name: str, agent: GuestAgent | None, directory: str) -> None:
        self.vm_name = vm_name
        self.agent = agent
        self.directory = directory
        self.quiesced = False

    @classmethod
    async def open(
        cls, vm_name: str, agent_path: str | None, directory: str, wanted: bool
    ) -> Quiescer:
        """A Quiescer that freezes (``wanted``) or does nothing. Fails at once when the
        agent is not configured or does not answer."""
        if not wanted:
            return cls(vm_name, None, directory)
        if agent_path is None:
            raise QuiesceError(
                f"--quiesce: VM {vm_name} has no guest agent (start the daemon with "
                f"--qga {vm_name}=PATH)"
            )
        try:
            agent = await GuestAgent.connect(agent_path)
        except GuestAgentError as e:
            raise QuiesceError(f"--quiesce: VM {vm_name}: {e}") from None
        return cls(vm_name, agent, directory)

    async def aclose(self) -> None:
        if self.agent is not None:
            await self.agent.close()

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """The guest's filesystems frozen for the body (nothing when not quiescing)."""
        if self.agent is None:
            yield
            return
        agent = self.agent
        write_json(_marker(self.directory), {"since": time.time(), "agent": agent.path})
        started = time.monotonic()
        try:
            try:
                count = await agent.execute("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
            except GuestAgentError as e:
                raise QuiesceError(f"--quiesce: VM {self.vm_name}: {e}; thawed") from None
            log.info("VM %s: guest filesystems frozen (%s)", self.vm_name, count)
            yield
            self.quiesced = True
        finally:
            await _thaw(agent, self.vm_name)
            remove_durably(_marker(self.directory))
            log.info(
                "VM %s: guest frozen for %.1f ms",
                self.vm_name,
                (time.monotonic() - started) * 1000,
            )


async def _thaw(agent: GuestAgent, vm_name: str) -> None:
    try:
        await agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
    except GuestAgentError as e:
        # The connection may be the problem: try once more on a fresh one.
        log.error("VM %s: thaw failed (%s); retrying on a new connection", vm_name, e)
        await thaw_path(agent.path, vm_name)


async def thaw_path(path: str, vm_name: str) -> bool:
    """Thaw the guest behind ``path``; True when it is thawed."""
    try:
        agent = await GuestAgent.connect(path)
    except GuestAgentError as e:
        log.error("VM %s: cannot thaw: %s", vm_name, e)
        return False
    try:
        if await agent.execute("guest-fsfreeze-status") == "frozen":
            await agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
            log.warning("VM %s: guest filesystems thawed", vm_name)
        return True
    except GuestAgentError as e:
        log.error("VM %s: cannot thaw: %s", vm_name, e)
        return False
    finally:
        await agent.close()


async def thaw_left_frozen(vm_name: str, directory: str) -> None:
    """At start-up: a guest that an earlier daemon froze and could not thaw is thawed."""
    marker = read_json(_marker(directory))
    if not isinstance(marker, dict):
        return
    log.warning("VM %s: an earlier daemon left the guest frozen; thawing", vm_name)
    if await thaw_path(str(marker.get("agent")), vm_name):
        remove_durably(_marker(directory))
