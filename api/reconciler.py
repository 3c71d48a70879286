"""The reconciler: PostgreSQL is the record, and the queues are made to agree with it.

Every few seconds it
- takes back jobs whose lease expired (a dead or hung worker) and republishes them, or faults
  them after ``max_attempts`` deliveries (the requester is not charged for a faulted job);
- reads each model queue's depth and consumers, and how many live workers serve each model
  (their heartbeats; served to the status endpoints);
- republishes queued jobs whose message vanished (purged, dropped, lost with a publish that
  failed after commit): when a queue holds fewer messages than the database has queued jobs for
  it, the stale ones are published again. Copies are harmless: only one claim can succeed;
- ages jobs that wait: each ``aging_seconds`` of waiting raises a job one priority tier
  (ledger.tiers.aged_tier) and republishes it at that priority, so nobody starves. The copy at the
  old priority stays in the queue until a worker drops it at claim time (at most four per job).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import aiormq
from sqlalchemy.engine import Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api import job_store
from api.dispatch import publish_job
from api.job_store import live_workers_by_model
from api.jobs import QUEUED, job_message
from broker.amqp import Publisher
from broker.errors import BrokerError
from broker.topology import job_queue
from config.database import as_utc, utcnow
from ledger.tiers import HIGHEST_TIER, aged_tier

log = logging.getLogger(__name__)

#: Failures of an outage (asyncpg's refused connections are plain ConnectionRefusedError).
_OUTAGES = (SQLAlchemyError, ConnectionError, BrokerError, aiormq.exceptions.AMQPError)


@dataclass(frozen=True)
class QueueStats:
    ready: int
    consumers: int


class Reconciler:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, connection: aio_pika.abc.AbstractRobustConnection,
                 models: list[str], *, max_attempts: int, republish_after: float, aging_seconds: float,
                 held_per_consumer: int = 1, live_seconds: float = 15.0,
                 leads: Callable[[], bool] = lambda: True) -> None:
        self._engine = engine
        self._publisher = publisher
        self._connection = connection
        self._models = models
        self._max_attempts = max_attempts
        self._republish_after = timedelta(seconds=republish_after)
        self._aging_seconds = aging_seconds
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._leads = leads  # whether this process runs the horde-wide repairs (its dispatcher leads)
        self._held_per_consumer = held_per_consumer  # what the dispatcher holds unacked per model queue
        self._live = timedelta(seconds=live_seconds)
        self.queue_stats: dict[str, QueueStats] = {}
        self.serving: dict[str, int] = {}  # model -> workers heard from in the last ``live_seconds``

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except _OUTAGES as exc:  # the database or broker is away: one line a tick, not a traceback
                log.warning("reconciler tick failed, retrying: %r", exc)
            except Exception:  # a broker or database hiccup: log it and try again next tick
                log.exception("reconciler tick failed")
            await asyncio.sleep(interval)

    async def tick(self) -> None:
        """Every process keeps its own view of the queues (the status endpoints read it); the
        repairs, which scan the queued jobs, run in one process only: the one whose dispatcher
        leads (with several API processes each would otherwise repeat them)."""
        await self.refresh_queue_stats()
        if self._leads():
            await self.take_back_expired()
            await self.republish_vanished()
            await self.age_waiting_jobs()

    async def take_back_expired(self) -> None:
        now = utcnow()
        async with self._engine.begin() as conn:
            expired = await job_store.expired_leases(conn, now=now)
            released = [
                row for row in [
                    await job_store.release(conn, job_id=e.id, lease_id=e.lease_id, max_attempts=self._max_attempts,
                                            reason="lease expired", now=now)
                    for e in expired
                ] if row is not None
            ]
        for row in released:
            log.warning("job %s: lease expired, now %s (attempt %d)", row.id, row.state, row.attempts)
            if row.state == QUEUED:
                await publish_job(self._publisher, job_message(row))

    async def refresh_queue_stats(self) -> None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        stats = {}
        for model in self._models:
            # robust=False: a robust channel answers repeated passive declares from a cache, with the
            # counts of the first one; the reconciler needs the broker's counts of now.
            declared = await self._channel.declare_queue(job_queue(model), passive=True, robust=False)
            result = declared.declaration_result
            stats[model] = QueueStats(ready=result.message_count or 0, consumers=result.consumer_count or 0)
        self.queue_stats = stats
        async with self._engine.connect() as conn:
            self.serving = await live_workers_by_model(conn, since=utcnow() - self._live)

    async def republish_vanished(self) -> None:
        now = utcnow()
        async with self._engine.connect() as conn:
            expected = await job_store.queued_by_models(conn)
            # A delivery a worker holds before claiming it is not "ready" either; if it is also older
            # than republish_after it gets a copy, which costs a dropped duplicate, never a lost job.
            short = {model for model, count in expected.items() if model in self.queue_stats
                     and count > self.queue_stats[model].ready
                     + self._held_per_consumer * self.queue_stats[model].consumers}
            if not short:
                return
            stale = [row for row in await job_store.stale_queued(conn, published_before=now - self._republish_after)
                     if short.intersection(row.models)]
        for row in stale:
            await publish_job(self._publisher, job_message(row))
        async with self._engine.begin() as conn:
            await job_store.mark_published(conn, [row.id for row in stale], now)
        if stale:
            log.warning("republished %d queued jobs missing from queues %s", len(stale), sorted(short))

    async def age_waiting_jobs(self) -> None:
        if self._aging_seconds <= 0:
            return
        now = utcnow()
        async with self._engine.begin() as conn:
            candidates = await job_store.waiting_since(
                conn, published_before=now - timedelta(seconds=self._aging_seconds), below_tier=HIGHEST_TIER)
            raised = await job_store.raise_tiers(conn, tier_raises(candidates, now, self._aging_seconds), now)
        # One burst of pipelined confirmed publishes: a round trip per job took a tick of ~1,000
        # jobs several seconds under a backlog (bench/simulation.py --aging-seconds).
        await asyncio.gather(*(publish_job(self._publisher, job_message(row)) for row in raised))
        if raised:
            log.info("aged %d waiting jobs to a higher priority tier", len(raised))

    def is_possible(self, models: list[str]) -> bool:
        """Whether a live worker serves one of these models right now."""
        return any(self.serving.get(m, 0) > 0 for m in models)

    def workers_for(self, models: list[str]) -> int:
        return sum(self.serving.get(m, 0) for m in models)


def tier_raises(waiting: Iterable[Row[Any]], now: datetime, step_seconds: float) -> list[tuple[str, int, int]]:
    """(job id, tier, aged tier) of each waiting job (id, tier, published_at) due for a higher tier.

    Counted from the job's last publish (its last raise), not its creation: from creation, every
    tick would add the whole wait again."""
    raises = []
    for job in waiting:
        waited = (now - as_utc(job.published_at)).total_seconds()
        tier = aged_tier(job.tier, waited_seconds=waited, step_seconds=step_seconds)
        if tier > job.tier:
            raises.append((job.id, job.tier, tier))
    return raises
