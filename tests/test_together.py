"""all_of: results in order; the first failure stops the others and is raised as it is."""

import asyncio

import pytest

from nbdsrv.together import all_of


async def test_results_come_in_the_order_given() -> None:
    async def after(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        return value

    assert await all_of(after(0.02, 1), after(0.0, 2), after(0.01, 3)) == [1, 2, 3]


async def test_the_first_failure_cancels_the_others_and_is_raised_unwrapped() -> None:
    stopped: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            stopped.append("slow")

    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("no such thing")

    with pytest.raises(LookupError, match="no such thing"):
        await all_of(slow(), fails())
    assert stopped == ["slow"]  # stopped before all_of returned


async def test_nothing_to_run_is_no_result() -> None:
    assert await all_of() == []
