"""Whose turn it is to claim next: one job at a time, jobs of the owner's chosen users first.

A worker holds a delivery from each of its queues at once (prefetch 1 per queue). The one that
gets the turn claims and then takes the device; the others wait. Jobs from the worker's own queue
(the users its owner serves first, issue 5) go before jobs from the models' queues; among equals,
first come first served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @asynccontextmanager
    async def turn(self, *, first: bool = False) -> AsyncIterator[None]:
        """Hold the turn for the body; ``first``: a job of the owner's chosen users."""
        if self._held or self._waiters:
            await self._await(self._enqueue(0 if first else 1, next(self._order)))
        else:
            self._held = True
        try:
            yield
        finally:
            self._release()

    def first_waiting(self) -> bool:
        """Whether a job of the owner's chosen users waits for the turn."""
        return any(rank == 0 and not future.done() for rank, _, future in self._waiters)

    async def give_way(self) -> None:
        """Hand the turn to the waiting jobs that go first, and wait to get it back after them."""
        seq = next(self._order)
        future = self._enqueue(1, -seq)  # ahead of the other ordinary jobs: it was there before them
        self._release()
        await self._await(future)

    def _enqueue(self, rank: int, seq: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, seq, future))
        return future

    async def _await(self, future: asyncio.Future[None]) -> None:
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed the turn just as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the turn passes straight on; _held stays True
                return
        self._held = False
