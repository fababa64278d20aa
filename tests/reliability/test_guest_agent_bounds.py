"""nbdsrv's guest agent client reads within bounds: stale bytes before the sync delimiter
are skipped however many (up to a cap), and a reply line too long fails that operation
with a GuestAgentError, never another exception (tests/reliability/fake_agent.py)."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdsrv.qemu.guest_agent import GuestAgent, GuestAgentError
from tests.reliability.fake_agent import FakeAgent

KiB = 1024


@pytest.fixture
def agent(workdir: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(workdir / "qga.sock")
    yield fake
    fake.close()


async def status(path: Path) -> object:
    client = await GuestAgent.connect(str(path), timeout=10)
    try:
        return await client.execute("guest-fsfreeze-status")
    finally:
        await client.close()


def test_stale_bytes_beyond_the_line_limit_are_skipped(agent: FakeAgent) -> None:
    agent.stale = b"{" * (192 * KiB) + b'{"return": 1}\n'
    assert asyncio.run(status(agent.path)) == "thawed"


def test_endless_stale_bytes_fail_the_sync(agent: FakeAgent) -> None:
    agent.stale = b"x" * (2048 * KiB)
    with pytest.raises(GuestAgentError, match="does not answer"):
        asyncio.run(status(agent.path))


def test_an_oversize_reply_fails_the_command(agent: FakeAgent) -> None:
    agent.oversize_status = True
    with pytest.raises(GuestAgentError, match="guest-fsfreeze-status"):
        asyncio.run(status(agent.path))
