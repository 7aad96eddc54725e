"""Stopping the cluster member's background tasks, even when a library
swallows a cancel (redis-py can, when it lands inside a command)."""

from __future__ import annotations

import asyncio

from gateway.cluster.membership import cancel_until_done


async def test_a_task_that_swallows_its_cancel_is_cancelled_again() -> None:
    cancels = 0

    async def swallows_the_first_cancel() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise
                # The library's bug: the cancel is dropped and the loop goes on.

    async def ends_at_its_cancel() -> None:
        await asyncio.sleep(3600)

    stubborn = asyncio.create_task(swallows_the_first_cancel())
    prompt = asyncio.create_task(ends_at_its_cancel())
    tasks = [stubborn, prompt]
    await asyncio.sleep(0)  # both at their first await
    async with asyncio.timeout(5):
        await cancel_until_done(tasks)
    assert cancels == 2
    assert all(task.cancelled() for task in tasks)
