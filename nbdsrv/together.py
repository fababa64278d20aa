"""Awaitables run at the same time, all or nothing."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def all_of(*awaitables: Awaitable[T]) -> list[T]:
    """Run ``awaitables`` together; their results, in order. The first failure cancels the
    others, waits until they have stopped (so none works on behind the caller's cleanup), and
    is raised as it is — not wrapped in an ExceptionGroup as asyncio.TaskGroup would."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
