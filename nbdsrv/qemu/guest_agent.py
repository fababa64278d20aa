"""A client for the QEMU guest agent (qemu-ga) over the host side of its virtio-serial port.

The agent speaks QMP-like JSON without a greeting. A channel may hold stale bytes from an
earlier client, so every connection starts with ``guest-sync-delimited``: the agent answers
with a 0xFF byte and then the id we sent, and everything before that is discarded. The
chardev socket accepts connections even when no agent runs in the guest; only the sync tells
whether one answers. One client at a time: a connection lives for one operation.

Every read is bounded in size and time: an agent (a guest's program, so not trusted) that
sends a line longer than MAX_LINE or nothing at all fails its own VM's operation with a
GuestAgentError, never anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

from .errors import QEMUError

SYNC_TIMEOUT = 3.0
COMMAND_TIMEOUT = 10.0
_DELIMITER = b"\xff"
# The longest reply line read (nbdsrv's commands answer in a few bytes).
MAX_LINE = 64 * 1024
# Stale bytes skipped while looking for the sync delimiter before giving up.
MAX_STALE = 1024 * 1024


class GuestAgentError(QEMUError):
    """The guest agent cannot be reached, does not answer, or refused a command."""

    code = "guest-agent"


class GuestAgent:
    """One connection to a guest agent."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.path = path
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: str, timeout: float = SYNC_TIMEOUT) -> GuestAgent:
        """Connect and synchronise; GuestAgentError when no agent answers in ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        except (OSError, TimeoutError) as e:
            raise GuestAgentError(f"guest agent socket {path}: cannot connect ({e})") from None
        agent = cls(path, reader, writer)
        try:
            await agent._sync(timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def _sync(self, timeout: float) -> None:
        token = random.randrange(1, 1 << 31)
        self._send("guest-sync-delimited", {"id": token})
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._skip_to_delimiter()
                    reply = await self._read_reply()
                    if reply.get("return") == token:
                        return
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, OSError):
            raise GuestAgentError(
                f"the guest agent at {self.path} does not answer (is qemu-ga running in the guest?)"
            ) from None

    async def _skip_to_delimiter(self) -> None:
        """Discard stale bytes up to and including the next delimiter (at most MAX_STALE)."""
        skipped = 0
        while True:
            try:
                await self._reader.readuntil(_DELIMITER)
                return
            except asyncio.LimitOverrunError as e:
                skipped += e.consumed
                if skipped > MAX_STALE:
                    raise ValueError(f"{skipped} bytes without a sync delimiter") from None
                await self._reader.readexactly(e.consumed)

    def _send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._writer.write(json.dumps(message).encode() + b"\n")

    async def _read_reply(self) -> dict[str, Any]:
        """One reply line; ValueError when it is longer than MAX_LINE or not a JSON object."""
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ValueError(f"a reply line longer than {MAX_LINE} bytes") from None
        except asyncio.IncompleteReadError as e:
            line = e.partial
        if not line:
            raise asyncio.IncompleteReadError(line, None)
        reply = json.loads(line.strip(_DELIMITER + b" \r\n"))
        if not isinstance(reply, dict):
            raise ValueError("not a JSON object")
        return reply

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Any:
        """Run ``command``; its ``return`` value. GuestAgentError on error or timeout."""
        self._send(command, arguments)
        try:
            async with asyncio.timeout(timeout):
                reply = await self._read_reply()
        except TimeoutError:
            raise GuestAgentError(
                f"guest agent: {command} did not answer in {timeout:g}s"
            ) from None
        except (asyncio.IncompleteReadError, ValueError, OSError) as e:
            raise GuestAgentError(f"guest agent: {command}: connection lost ({e})") from None
        if "error" in reply:
            desc = (
                reply["error"].get("desc", reply["error"])
                if isinstance(reply["error"], dict)
                else reply["error"]
            )
            raise GuestAgentError(f"guest agent: {command} failed: {desc}")
        return reply.get("return")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()


async def agent_answers(path: str, timeout: float = 0.5) -> bool:
    """Whether a guest agent answers on ``path`` now."""
    try:
        agent = await GuestAgent.connect(path, timeout)
    except GuestAgentError:
        return False
    await agent.close()
    return True
