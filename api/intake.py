"""The accept path: store jobs and publish them, grouping concurrent submissions.

A 202 means the jobs are committed in the database AND confirmed by the broker. Submissions
that arrive while a flush is running wait for the next one (``api.grouping``), so each flush is
one INSERT of all their rows (autocommit) plus one burst of pipelined, confirmed publishes. A
lone submission is flushed at once (no timer), so batching adds no latency when the horde is quiet.

At the door: a single-job submission that a waiting worker fits (``Door``: the dispatcher, when
this process leads) is inserted already leased, in one statement of its own, and offered at once
instead of being published; its 202 then means committed and leased, and if its worker never
finishes, the lease expires and the reconciler queues it like any other (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.dispatch import publish_job, publish_priority_copies
from api.errors import ServiceUnavailable
from api.grouping import Groups
from api.jobs import QUEUED, NewJob
from api.matching import Ask, Held
from api.owner_priority import PriorityRoutes
from api.tables import jobs, unindexed
from broker.amqp import Publisher
from broker.messages import ClaimReply, JobMessage

log = logging.getLogger(__name__)

MAX_ROWS_PER_FLUSH = 1000  # keeps one INSERT under the drivers' bind-parameter limits
MAX_FLUSHES_IN_FLIGHT = 2


@dataclass
class _Submission:
    jobs: Sequence[NewJob]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Door(Protocol):
    """Hands arriving jobs to waiting workers: ``api.dispatcher.Dispatcher``."""

    async def at_the_door(self, arriving: Sequence[JobMessage]) -> list[tuple[Ask, Held]]: ...

    async def lease_at_door(self, conn: AsyncConnection, row: dict[str, Any], ask: Ask,
                            held: Held) -> ClaimReply | None: ...

    async def hand_over(self, pairs: Sequence[tuple[Ask, Held]], granted: Mapping[str, ClaimReply]) -> set[str]: ...


class Intake:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, routes: PriorityRoutes | None = None,
                 door: Door | None = None) -> None:
        # One statement per flush: autocommit saves the BEGIN/COMMIT round trips.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._publisher = publisher
        self._routes = routes
        self._door = door
        self._groups: Groups[_Submission] = Groups(self._flush, max_size=MAX_ROWS_PER_FLUSH,
                                                   max_in_flight=MAX_FLUSHES_IN_FLIGHT, size=lambda s: len(s.jobs))

    async def submit(self, new_jobs: Sequence[NewJob]) -> None:
        """Return once every job is stored and queued; raise ServiceUnavailable otherwise."""
        submission = _Submission(new_jobs)
        self._groups.add(submission)
        await submission.done

    async def _flush(self, batch: list[_Submission]) -> None:
        await self._through_the_door(batch)
        batch = [s for s in batch if not s.done.done()]
        if not batch:
            return
        try:
            await self._store(batch)
        except SQLAlchemyError as exc:
            log.error("storing %d submissions failed: %s", len(batch), exc)
            _fail(batch, _database_down())
            return
        outcomes = await asyncio.gather(*(self._publish(s) for s in batch), return_exceptions=True)
        failed = [s for s, outcome in zip(batch, outcomes, strict=True) if isinstance(outcome, BaseException)]
        await self._withdraw(failed)
        for submission, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _fail([submission], ServiceUnavailable(
                    "The message broker is unavailable; nothing was queued. Retry shortly.",
                    rc="BrokerUnavailable"))
            elif not submission.done.done():
                submission.done.set_result(None)

    async def _through_the_door(self, batch: list[_Submission]) -> None:
        """Insert already leased, and answer, the submissions a waiting worker takes at once; the
        others (no worker fits, or its lease was refused) stay in ``batch`` for the queue."""
        if self._door is None:
            return
        alone = {s.jobs[0].message.job_id: s for s in batch if len(s.jobs) == 1}  # none half handed over
        pairs = await self._door.at_the_door([s.jobs[0].message for s in alone.values() if not self._served_first(s)])
        if not pairs:
            return
        granted: dict[str, ClaimReply] = {}
        for ask, held in pairs:
            submission = alone[held.job.job_id]
            try:
                async with self._autocommit.connect() as conn:
                    reply = await self._door.lease_at_door(conn, submission.jobs[0].row, ask, held)
            except SQLAlchemyError as exc:
                log.error("job %s: not stored, database error: %s", held.job.job_id, exc)
                _fail([submission], _database_down())
                continue
            if reply is not None:
                granted[held.job.job_id] = reply
        for job_id in await self._door.hand_over(pairs, granted):
            alone[job_id].done.set_result(None)

    def _served_first(self, submission: _Submission) -> bool:
        """Whether an owner serves the job's user first (issue 5): it goes to that worker's own queue."""
        job = submission.jobs[0]
        return bool(self._routes and self._routes.workers_for(job.row["user_id"], job.message.models))

    async def _store(self, batch: list[_Submission]) -> None:
        rows = [job.row for s in batch for job in s.jobs]
        async with self._autocommit.connect() as conn:
            # executemany: compiled once and cached, rows pipelined by asyncpg (a multi-VALUES
            # statement would be recompiled for every batch size: docs/benchmarks.md)
            await conn.execute(sa.insert(jobs), rows)

    async def _publish(self, submission: _Submission) -> None:
        await asyncio.gather(*(self._publish_one(job) for job in submission.jobs))

    async def _publish_one(self, job: NewJob) -> None:
        first = self._routes.workers_for(job.row["user_id"], job.message.models) if self._routes else []
        if first:
            await publish_priority_copies(self._publisher, job.message, first)
        await publish_job(self._publisher, job.message)

    async def _withdraw(self, failed: list[_Submission]) -> None:
        """Delete the rows of submissions whose publish failed: the client gets a 503, not a ghost job.

        If even that fails, the reconciler republishes them later: run once rather than lose one.
        """
        ids = [job.row["id"] for s in failed for job in s.jobs]
        if not ids:
            return
        try:
            async with self._autocommit.connect() as conn:
                await conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids), unindexed(jobs.c.state) == QUEUED))
        except SQLAlchemyError as exc:
            log.error("could not withdraw %d unpublished jobs (the reconciler will publish them): %s",
                      len(ids), exc)


def _fail(batch: list[_Submission], error: Exception) -> None:
    for submission in batch:
        if not submission.done.done():
            submission.done.set_exception(error)


def _database_down() -> ServiceUnavailable:
    return ServiceUnavailable("The database is unavailable; nothing was queued. Retry shortly.",
                              rc="DatabaseUnavailable")
