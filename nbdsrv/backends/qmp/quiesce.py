"""Application-consistent points in time: the guest's filesystems frozen for the instant of
the QMP transaction, through the QEMU guest agent (``--qga VM=PATH``, ``--quiesce``).

::

    Quiescer.open()   connect + sync the agent   (no agent: fail here, nothing done yet)
        ... intents, scratch images ...
    async with q.frozen():                     marker file written, guest-fsfreeze-freeze
        transaction                            (the point in time)
                                               guest-fsfreeze-thaw, marker removed

The thaw is always attempted: on every error path and on cancellation; a freeze that does
not answer within FREEZE_TIMEOUT is thawed and fails. A thaw the agent does not confirm
(an error, no answer within THAW_TIMEOUT) fails the operation with GuestFrozenError, keeps
the marker and leaves the VM's FrozenGuest retrying until the agent confirms; if the daemon
dies while the guest is frozen, the next start finds the marker and retries the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from ...backup.crash_points import crash_point
from ...errors import NbdsrvError
from ...qemu.guest_agent import GuestAgent, GuestAgentError
from ..frozen_guest import FrozenGuest

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 10.0
THAW_TIMEOUT = 10.0


class QuiesceError(NbdsrvError):
    """--quiesce cannot be honoured; nothing was done."""

    code = "quiesce"


class Quiescer:
    """A guest agent connection held from the checks of an operation to its transaction."""

    def __init__(self, vm_name: str, agent: GuestAgent | None, marker: FrozenGuest) -> None:
        self.vm_name = vm_name
        self.agent = agent
        self.marker = marker
        self.quiesced = False

    @classmethod
    async def open(
        cls, vm_name: str, agent_path: str | None, marker: FrozenGuest, wanted: bool
    ) -> Quiescer:
        """A Quiescer that freezes (``wanted``) or does nothing. Fails at once when the
        agent is not configured or does not answer, or the guest may still be frozen."""
        if not wanted:
            return cls(vm_name, None, marker)
        if agent_path is None:
            raise QuiesceError(
                f"--quiesce: VM {vm_name} has no guest agent (start the daemon with "
                f"--qga {vm_name}=PATH)"
            )
        if marker.frozen:
            raise QuiesceError(
                f"--quiesce: VM {vm_name}: the guest may still be frozen from an earlier "
                "--quiesce and nbdsrv is retrying its thaw; try again once `nbdsrv status` "
                "shows guest_frozen false"
            )
        try:
            agent = await GuestAgent.connect(agent_path)
        except GuestAgentError as e:
            raise QuiesceError(f"--quiesce: VM {vm_name}: {e}") from None
        return cls(vm_name, agent, marker)

    async def aclose(self) -> None:
        if self.agent is not None:
            await self.agent.close()

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """The guest's filesystems frozen for the body (nothing when not quiescing).
        GuestFrozenError when the thaw is not confirmed, whatever the body did."""
        if self.agent is None:
            yield
            return
        agent = self.agent
        self.marker.mark(agent=agent.path)
        started = time.monotonic()
        try:
            try:
                count = await agent.execute("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
            except GuestAgentError as e:
                raise QuiesceError(f"--quiesce: VM {self.vm_name}: {e}; thawed") from None
            crash_point("quiesce:after-freeze")
            log.info("VM %s: guest filesystems frozen (%s)", self.vm_name, count)
            yield
            self.quiesced = True
        finally:
            try:
                await agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
            except GuestAgentError as e:
                self.quiesced = False
                log.error("VM %s: thaw not confirmed: %s", self.vm_name, e)
                raise self.marker.not_thawed(str(e)) from None
            self.marker.clear()
            log.info(
                "VM %s: guest frozen for %.1f ms",
                self.vm_name,
                (time.monotonic() - started) * 1000,
            )


async def thaw_path(path: str, vm_name: str) -> bool:
    """Thaw the guest behind ``path``; True when the agent confirms it is thawed."""
    try:
        agent = await GuestAgent.connect(path)
    except GuestAgentError as e:
        log.error("VM %s: cannot thaw: %s", vm_name, e)
        return False
    try:
        if await agent.execute("guest-fsfreeze-status") != "thawed":
            await agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
            log.warning("VM %s: guest filesystems thawed", vm_name)
        return bool(await agent.execute("guest-fsfreeze-status") == "thawed")
    except GuestAgentError as e:
        log.error("VM %s: cannot thaw: %s", vm_name, e)
        return False
    finally:
        await agent.close()
