"""Where a queued job stands: how many queued jobs are served before it (all models together).

The order is the queues' own: higher tiers first, then older first. Counting that in the database
on every status call costs a scan of every queued job ahead: 33 ms a call with 100,000 queued
(`bench/simulation.py`), so 50 status calls/s kept PostgreSQL's core busy and slowed every other
statement, submissions included.

Instead each API process keeps a snapshot of the queue's order and answers from it with a binary
search. The snapshot is read in one statement, only while someone asks, and at most every
``max_age`` seconds (or less often, so that reading takes at most ~5% of the time); calls that
come while it is re-read get the last one, so none waits for the read. It holds, per tier, the
number of queued jobs and the creation time of every ``stride``-th of them in order: every one
(exact) while the queue is small, about ``SAMPLES`` in all for a big one, so a position there is
off by less than ``stride``. A position is also a few seconds old (``max_age``, more while a
re-read runs, never over ``stale_limit``): jobs served since still count, jobs queued since do
not. It is a hint for people waiting (AI Horde's own is approximate too), never used to decide
anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.jobs import QUEUED
from api.tables import jobs
from config.database import as_utc

log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: About how many creation times a snapshot of a big queue holds (100,000 queued: one in 50).
SAMPLES = 2000
#: Re-read no sooner than this many times the last read took: reading stays under ~5% of the time.
READ_SPACING = 20


class QueueSnapshot:
    """The queued jobs' order at one moment: per tier, how many there are and the creation time of
    every ``stride``-th of them, ascending (the 1st, the ``stride + 1``-th, …)."""

    def __init__(self, samples: Iterable[tuple[int, datetime, int]], stride: int = 1) -> None:
        """``samples``: (tier, created_at, jobs of that tier), ordered by tier then created_at."""
        self.stride = stride
        self._times: dict[int, array[float]] = {}
        self._counts: dict[int, int] = {}
        for tier, created_at, count in samples:
            self._times.setdefault(tier, array("d")).append(_seconds(created_at))
            self._counts[tier] = count
        self.size = sum(self._counts.values())

    def position(self, tier: int, created_at: datetime) -> int:
        """Jobs served before one of ``tier`` created at ``created_at``: every job of a higher
        tier, and the older ones of its own (exact with a stride of 1, else off by less than it)."""
        higher = sum(count for t, count in self._counts.items() if t > tier)
        own = self._times.get(tier)
        if not own:
            return higher
        return higher + min(self._counts[tier], bisect_left(own, _seconds(created_at)) * self.stride)


class QueuePositions:
    """A ``QueueSnapshot`` of this process, re-read when older than ``max_age`` seconds.

    While a re-read runs, calls are answered from the snapshot in hand if it is younger than
    ``stale_limit`` seconds, so no status call waits for the read; an older one (a horde nobody
    polled for a while) is not served, and the call waits for the new one."""

    def __init__(self, engine: AsyncEngine, *, max_age: float = 2.0, stale_limit: float = 30.0,
                 clock: Clock = time.monotonic) -> None:
        self._engine = engine
        self._max_age = max_age
        self._stale_limit = stale_limit
        self._clock = clock
        self._snapshot: QueueSnapshot | None = None
        self._taken_at = float("-inf")
        self._fresh_until = float("-inf")
        self._reading: asyncio.Task[QueueSnapshot] | None = None

    async def position(self, tier: int, created_at: datetime) -> int:
        return (await self.snapshot()).position(tier, created_at)

    async def snapshot(self) -> QueueSnapshot:
        now = self._clock()
        if self._snapshot is not None and now < self._fresh_until:
            return self._snapshot
        reading = self._reading or self._start_reading()  # concurrent callers share one read
        if self._snapshot is not None and now - self._taken_at < self._stale_limit:
            return self._snapshot
        return await asyncio.shield(reading)

    def _start_reading(self) -> asyncio.Task[QueueSnapshot]:
        self._reading = asyncio.create_task(self._read())
        self._reading.add_done_callback(self._read_done)
        return self._reading

    def _read_done(self, task: asyncio.Task[QueueSnapshot]) -> None:
        self._reading = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Callers waiting for it get the error too; one answered from the last snapshot does not.
            log.warning("queue positions not re-read (%r); the next status call tries again", exc)

    async def _read(self) -> QueueSnapshot:
        started = self._clock()
        async with self._engine.connect() as conn:
            # The stride comes from the last snapshot's size; the first read counts the queue
            # first, so that a process started under a big backlog does not read it all.
            size = self._snapshot.size if self._snapshot else await _queued(conn)
            stride = max(1, size // SAMPLES)
            snapshot = QueueSnapshot((await conn.execute(_sampled(stride))).tuples(), stride)
        took = self._clock() - started
        self._snapshot, self._taken_at = snapshot, started
        self._fresh_until = started + max(self._max_age, READ_SPACING * took)
        return snapshot


async def _queued(conn: AsyncConnection) -> int:
    query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == QUEUED)
    return int((await conn.execute(query)).scalar_one())


def _sampled(stride: int) -> sa.Select[tuple[int, datetime, int]]:
    """Every ``stride``-th queued job of each tier in the queues' order, with its tier's count:
    numbered by a window over ix_jobs_state_tier_created, so only the samples leave the database."""
    ranked = sa.select(
        jobs.c.tier, jobs.c.created_at,
        sa.func.row_number().over(partition_by=jobs.c.tier, order_by=jobs.c.created_at).label("rank"),
        sa.func.count().over(partition_by=jobs.c.tier).label("count"),
    ).where(jobs.c.state == QUEUED).subquery()
    return (sa.select(ranked.c.tier, ranked.c.created_at, ranked.c["count"])
            .where((ranked.c.rank - 1) % stride == 0).order_by(ranked.c.tier, ranked.c.created_at))


def _seconds(moment: datetime) -> float:
    aware = as_utc(moment)
    assert aware is not None
    return aware.timestamp()
