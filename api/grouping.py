"""Work that arrives together is done together: the grouping behind the intake, the results
service and the uptime service.

A group starts at once while fewer than ``max_in_flight`` run (no timer: a lone item waits for
nothing, so a quiet horde pays no latency for it); whatever arrives meanwhile waits and forms the
next group. Groups so grow exactly as much as the work behind them (a transaction, a burst of
confirmed publishes) is slow, and one commit or one round trip serves all of a group.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Groups(Generic[T]):
    """Feeds ``process`` groups of the items added; ``size`` weighs an item against ``max_size``
    (a submission of several jobs weighs its jobs). ``process`` settles its items' outcomes
    itself, failures included: whoever added an item waits on it, not on the group."""

    def __init__(self, process: Callable[[list[T]], Awaitable[None]], *, max_size: int, max_in_flight: int = 2,
                 size: Callable[[T], int] = lambda _item: 1) -> None:
        self._process = process
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._size = size
        self._pending: deque[T] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    def add(self, item: T) -> None:
        self._pending.append(item)
        self._start()

    def _start(self) -> None:
        while self._pending and self._in_flight < self._max_in_flight:
            group, weight = [], 0
            while self._pending and (not group or weight + self._size(self._pending[0]) <= self._max_size):
                weight += self._size(self._pending[0])
                group.append(self._pending.popleft())
            self._in_flight += 1
            task = asyncio.create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[T]) -> None:
        try:
            await self._process(group)
        finally:
            self._in_flight -= 1
            self._start()
