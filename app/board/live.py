"""Live updates for every open board from one shared poller.

Each open page subscribes to a topic (the board at page N, or one job). One task waits for
the source to change, probes its version, and only when it moved reads each watched topic
once and fans the rendered sections out to every subscriber. The store is read once per change
per watched topic, whatever the number of open pages; in Convex mode the probe is the snapshot
query itself, at most once per `poll_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fondation.board")

Read = Callable[[], Awaitable[Any]]
Render = Callable[[Any], dict[str, Any]]
Probe = Callable[[], Awaitable[str | None]]
Wait = Callable[[float], Coroutine[Any, Any, None]]


@dataclass(eq=False)
class _Topic:
    read: Read
    render: Render
    version: str | None = None
    payload: dict[str, Any] | None = None
    queues: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)


class LiveHub:
    """Reads once per change, sends to all. `reads` counts topic reads (for tests/bench)."""

    def __init__(
        self,
        *,
        wait_change: Wait,
        probe: Probe,
        poll_s: float = 1.0,
        debounce_s: float = 0.2,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._wait_change = wait_change
        self._stopping = stopping
        self._probe = probe
        self._poll_s = poll_s
        self._debounce_s = debounce_s
        self._topics: dict[str, _Topic] = {}
        self._kick = asyncio.Event()
        self._seen: str | None = None
        self._closed = False
        self.reads = 0

    @property
    def subscribers(self) -> int:
        return sum(len(t.queues) for t in self._topics.values())

    def subscribe(
        self, key: str, read: Read, render: Render
    ) -> asyncio.Queue[dict[str, Any] | None]:
        """A queue that always holds the latest payload of `key` (None: the hub closed)."""
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic(read, render)
            self._kick.set()  # read the new topic at once
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1)
        if self._closed:
            queue.put_nowait(None)
        elif topic.payload is not None:
            queue.put_nowait(topic.payload)  # the page may predate the last change
        topic.queues.add(queue)
        return queue

    def unsubscribe(self, key: str, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        topic = self._topics.get(key)
        if topic is None:
            return
        topic.queues.discard(queue)
        if not topic.queues:
            del self._topics[key]

    def close(self) -> None:
        self._closed = True
        for topic in self._topics.values():
            for queue in topic.queues:
                _offer(queue, None)

    async def run(self) -> None:
        while not self._closed:
            await self._next_wake()
            if self._stopping():  # draining: end every stream so the server can stop
                self.close()
                return
            if not self._topics:
                continue
            await asyncio.sleep(self._debounce_s)  # one read for a burst of writes
            try:
                await self.refresh()
            except Exception:  # the source may be briefly unreachable: try again later
                log.exception("board refresh failed")
                await asyncio.sleep(self._poll_s)

    async def _next_wake(self) -> None:
        """Wait for a change, a new topic or the poll period."""
        if self._kick.is_set():
            self._kick.clear()
            return
        kick = asyncio.create_task(self._kick.wait())
        change = asyncio.create_task(self._wait_change(self._poll_s))
        try:
            await asyncio.wait({kick, change}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (kick, change):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._kick.clear()

    async def refresh(self) -> None:
        """Read each watched topic once if the source changed (a new topic: at once)."""
        version = await self._probe()
        changed = version is None or version != self._seen
        self._seen = version
        for topic in list(self._topics.values()):
            if not changed and topic.payload is not None:
                continue
            data = await topic.read()
            self.reads += 1
            topic_version = getattr(data, "version", None)
            if topic.payload is not None and topic_version == topic.version is not None:
                continue
            topic.version = topic_version
            topic.payload = topic.render(data)
            for queue in topic.queues:
                _offer(queue, topic.payload)


def _offer(queue: asyncio.Queue[dict[str, Any] | None], item: dict[str, Any] | None) -> None:
    """Put `item`, replacing a payload the subscriber has not taken yet."""
    with contextlib.suppress(asyncio.QueueEmpty):
        if queue.full():
            queue.get_nowait()
    queue.put_nowait(item)
