"""The accept path: store jobs and publish them, grouping concurrent submissions.

A 202 means the jobs are committed in the database AND confirmed by the broker. Submissions
that arrive while a flush is running wait for the next one (``api.grouping``), so each flush is
one INSERT of all their rows (autocommit) plus one burst of pipelined, confirmed publishes. A
lone submission is flushed at once (no timer), so batching adds no latency when the horde is quiet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api.errors import ServiceUnavailable
from api.dispatch import publish_job, publish_priority_copies
from api.grouping import Groups
from api.jobs import NewJob
from api.owner_priority import PriorityRoutes
from api.tables import jobs
from broker.amqp import Publisher

log = logging.getLogger(__name__)

MAX_ROWS_PER_FLUSH = 1000  # keeps one INSERT under the drivers' bind-parameter limits
MAX_FLUSHES_IN_FLIGHT = 2


@dataclass
class _Submission:
    jobs: Sequence[NewJob]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Intake:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, routes: PriorityRoutes | None = None) -> None:
        # One statement per flush: autocommit saves the BEGIN/COMMIT round trips.
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._publisher = publisher
        self._routes = routes
        self._groups: Groups[_Submission] = Groups(self._flush, max_size=MAX_ROWS_PER_FLUSH,
                                                   max_in_flight=MAX_FLUSHES_IN_FLIGHT, size=lambda s: len(s.jobs))

    async def submit(self, new_jobs: Sequence[NewJob]) -> None:
        """Return once every job is stored and queued; raise ServiceUnavailable otherwise."""
        submission = _Submission(new_jobs)
        self._groups.add(submission)
        await submission.done

    async def _flush(self, batch: list[_Submission]) -> None:
        try:
            await self._store(batch)
        except SQLAlchemyError as exc:
            log.error("storing %d submissions failed: %s", len(batch), exc)
            _fail(batch, ServiceUnavailable("The database is unavailable; nothing was queued. Retry shortly.",
                                            rc="DatabaseUnavailable"))
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

    async def _store(self, batch: list[_Submission]) -> None:
        rows = [job.row for s in batch for job in s.jobs]
        async with self._engine.connect() as conn:
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
            async with self._engine.connect() as conn:
                await conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids), jobs.c.state == "queued"))
        except SQLAlchemyError as exc:
            log.error("could not withdraw %d unpublished jobs (the reconciler will publish them): %s",
                      len(ids), exc)


def _fail(batch: list[_Submission], error: Exception) -> None:
    for submission in batch:
        if not submission.done.done():
            submission.done.set_exception(error)
