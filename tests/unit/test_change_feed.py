"""The store's change feed: wakes waiters, times out, and never swallows a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from app.adapters.sqlite_store import ChangeFeed


async def test_a_change_wakes_a_waiter_and_a_quiet_store_times_out() -> None:
    feed = ChangeFeed()
    waiter = asyncio.ensure_future(feed.wait(30))
    await asyncio.sleep(0)
    feed.notify()
    await asyncio.wait_for(waiter, 5)
    await feed.wait(0.01)  # nothing changes: returns after the timeout


async def test_a_cancel_that_meets_a_change_still_cancels() -> None:
    """Before: with `asyncio.wait_for`, a cancel arriving in the loop iteration in which a
    change completed the wait was swallowed (Python 3.11), and the board's dispatcher loop
    never ended: the worker's shutdown hung (seen as a 120 s test timeout, 1 run in ~30)."""
    feed = ChangeFeed()
    waiter = asyncio.ensure_future(feed.wait(30))
    await asyncio.sleep(0)  # the waiter is parked on its future
    feed.notify()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
