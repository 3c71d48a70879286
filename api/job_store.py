"""Job state moves in the database, each a conditional UPDATE so late or forged messages are no-ops.

Functions take an open connection inside the caller's transaction and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from api.jobs import CANCELLED, CLAIMED, DONE, FAULTED, QUEUED
from api.tables import HTTP_WORKER_AMQP_USER, jobs, unindexed, worker_uptime, workers


async def release(conn: AsyncConnection, *, job_id: str, lease_id: str, max_attempts: int, reason: str,
                  now: datetime, worker_id: int | None = None) -> Row[Any] | None:
    """Take a job back from its lease holder: ``claimed -> queued`` (to republish) or ``-> faulted``.

    Returns the updated row, or None when the lease was no longer current.
    """
    held = (jobs.c.id == job_id) & (unindexed(jobs.c.state) == CLAIMED) & (jobs.c.lease_id == lease_id)
    if worker_id is not None:
        held &= unindexed(jobs.c.worker_id) == worker_id
    exhausted = jobs.c.attempts + 1 >= max_attempts
    return (await conn.execute(
        sa.update(jobs).where(held)
        .values(
            state=sa.case((exhausted, FAULTED), else_=QUEUED),
            attempts=jobs.c.attempts + 1,
            # remembered, so that the holder's late result is not taken for a forgery (api/results.py)
            expired_lease_id=jobs.c.lease_id, expired_worker_id=jobs.c.worker_id,
            worker_id=None, lease_id=None, lease_deadline=None, claimed_at=None,
            fault_reason=reason[:2000],
            finished_at=sa.case((exhausted, now), else_=None),
            published_at=now,
        )
        .returning(*jobs.c)
    )).first()


async def give_back(conn: AsyncConnection, *, job_id: str, lease_id: str, worker_id: int,
                    now: datetime) -> Row[Any] | None:
    """A worker hands back a job it was offered and has not started: ``claimed -> queued`` without
    spending an attempt (nothing was tried). None when that lease is not current."""
    held = ((jobs.c.id == job_id) & (unindexed(jobs.c.state) == CLAIMED) & (jobs.c.lease_id == lease_id)
            & (unindexed(jobs.c.worker_id) == worker_id))
    return (await conn.execute(
        sa.update(jobs).where(held)
        .values(state=QUEUED, worker_id=None, lease_id=None, lease_deadline=None, claimed_at=None, published_at=now)
        .returning(*jobs.c)
    )).first()


async def expired_leases(conn: AsyncConnection, *, now: datetime, limit: int = 500) -> list[Row[Any]]:
    return list(await conn.execute(
        sa.select(jobs.c.id, jobs.c.lease_id)
        .where(jobs.c.state == CLAIMED, jobs.c.lease_deadline < now)
        .limit(limit)
    ))


async def cancel(conn: AsyncConnection, *, request_id: str, kind: str, now: datetime) -> int:
    """Cancel the ``kind`` jobs of a request that have not started; running ones finish (and are paid).

    The kind guards the endpoints: the image cancel must not touch a text request, nor the reverse."""
    result = await conn.execute(
        sa.update(jobs).where(jobs.c.request_id == request_id, jobs.c.kind == kind, jobs.c.state == QUEUED)
        .values(state=CANCELLED, finished_at=now)
    )
    return result.rowcount


async def request_jobs(conn: AsyncConnection, request_id: str) -> list[Row[Any]]:
    return list(await conn.execute(
        sa.select(jobs).where(jobs.c.request_id == request_id).order_by(jobs.c.created_at, jobs.c.id)
    ))


async def queued_by_models(conn: AsyncConnection) -> dict[str, int]:
    """How many queued jobs each model's queue should hold (a job naming k models is in k queues)."""
    models_text = sa.cast(jobs.c.models, sa.Text)
    rows = await conn.execute(
        sa.select(models_text, sa.func.count()).where(jobs.c.state == QUEUED).group_by(models_text)
    )
    counts: dict[str, int] = {}
    for models, count in rows:
        for model in orjson.loads(models):
            counts[model] = counts.get(model, 0) + count
    return counts


async def stale_queued(conn: AsyncConnection, *, published_before: datetime, limit: int = 1000) -> list[Row[Any]]:
    return list(await conn.execute(
        sa.select(jobs).where(jobs.c.state == QUEUED, jobs.c.published_at < published_before)
        .order_by(jobs.c.tier.desc(), jobs.c.created_at).limit(limit)
    ))


async def mark_published(conn: AsyncConnection, job_ids: list[str], now: datetime) -> None:
    if job_ids:
        await conn.execute(sa.update(jobs).where(jobs.c.id.in_(job_ids)).values(published_at=now))


async def waiting_since(conn: AsyncConnection, *, published_before: datetime, below_tier: int,
                        limit: int = 1000) -> list[Row[Any]]:
    """Queued jobs last published before ``published_before`` whose tier is below ``below_tier``."""
    return list(await conn.execute(
        sa.select(jobs.c.id, jobs.c.tier, jobs.c.published_at)
        .where(jobs.c.state == QUEUED, jobs.c.tier < below_tier, jobs.c.published_at < published_before)
        .order_by(jobs.c.published_at).limit(limit)
    ))


async def raise_tiers(conn: AsyncConnection, raises: Sequence[tuple[str, int, int]], now: datetime) -> list[Row[Any]]:
    """Move still-queued jobs up from tier ``old`` to ``new`` ((job id, old, new) each), leaving
    alone those that moved on (claimed, cancelled, aged already); the rows raised.

    One UPDATE per (old, new) pair, not one per job: the rows are locked for one statement, so the
    dispatcher's leases of the same queue heads do not wait behind a long transaction."""
    by_step: dict[tuple[int, int], list[str]] = {}
    for job_id, old, new in raises:
        by_step.setdefault((old, new), []).append(job_id)
    raised: list[Row[Any]] = []
    for (old, new), job_ids in sorted(by_step.items()):
        raised += (await conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(job_ids), unindexed(jobs.c.state) == QUEUED, jobs.c.tier == old)
            .values(tier=new, published_at=now).returning(*jobs.c)
        )).all()
    return raised


async def live_workers_by_model(conn: AsyncConnection, *, since: datetime) -> dict[str, int]:
    """How many AMQP workers in service, heard from (heartbeat) since ``since``, serve each model
    (HTTP workers are counted apart, from their polls)."""
    rows = await conn.execute(
        sa.select(workers.c.models).join(worker_uptime, worker_uptime.c.worker_id == workers.c.id)
        .where(worker_uptime.c.last_seen >= since, workers.c.suspended_at.is_(None),
               workers.c.paused.is_(False), workers.c.maintenance.is_(False),
               workers.c.amqp_user != HTTP_WORKER_AMQP_USER))
    counts: dict[str, int] = {}
    for (models,) in rows:
        for model in models or []:
            counts[model] = counts.get(model, 0) + 1
    return counts


# --- completions in groups (api/results.py) ---------------------------------------------------------
# Built once, with the same SQL for any group size (so compiled once), and portable: PostgreSQL and
# SQLite alike (an expanding IN, and an UPDATE run as executemany, its rows pipelined by asyncpg).

_HELD = sa.select(jobs).where(jobs.c.id.in_(sa.bindparam("ids", expanding=True)))

_DONE = {"state": DONE, "seed": sa.bindparam("b_seed"), "censored": sa.bindparam("b_censored"),
         "result_path": sa.bindparam("b_path"), "finished_at": sa.bindparam("b_now"),
         "price": sa.func.coalesce(sa.bindparam("b_price", type_=sa.BigInteger), jobs.c.price)}
_COMPLETE = (
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("b_id"), unindexed(jobs.c.worker_id) == sa.bindparam("b_worker"),
           jobs.c.lease_id == sa.bindparam("b_lease"), unindexed(jobs.c.state) == CLAIMED)
    .values(**_DONE)
)
#: A late result: the job is queued again since that lease expired, and nobody has taken it.
_COMPLETE_LATE = (
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("b_id"), jobs.c.expired_worker_id == sa.bindparam("b_worker"),
           jobs.c.expired_lease_id == sa.bindparam("b_lease"), unindexed(jobs.c.state) == QUEUED)
    .values(worker_id=sa.bindparam("b_worker"), lease_id=sa.bindparam("b_lease"), **_DONE)
)


@dataclass(frozen=True)
class Completion:
    """One ``claimed -> done`` move for :func:`complete_many`; ``price`` None keeps the quote."""
    job_id: str
    worker_id: int
    lease_id: str
    seed: str
    censored: bool
    result_path: str
    price: int | None = None
    late: bool = False  # from the holder of the lease the job was taken back from (``_COMPLETE_LATE``)


async def held_jobs(conn: AsyncConnection, job_ids: Sequence[str]) -> dict[str, Row[Any]]:
    """The rows of these jobs, whatever their state, by id (one SELECT for a whole group)."""
    if not job_ids:
        return {}
    rows = await conn.execute(_HELD, {"ids": list(job_ids)})
    return {row.id: row for row in rows}


async def complete_many(conn: AsyncConnection, completions: Sequence[Completion], now: datetime) -> dict[str, Row[Any]]:
    """``claimed -> done`` for many jobs, each if its worker holds the lease named, or, ``late``,
    ``queued -> done`` if the job was taken back from that lease and nobody has taken it since
    (``price`` None keeps the quote; text jobs are settled on what they returned). Returns the
    ``done`` rows of these jobs by id, this call's and earlier ones alike (a redelivered
    completion): the caller checks each row's worker and lease against its completion."""
    if not completions:
        return {}
    for statement, late in ((_COMPLETE, False), (_COMPLETE_LATE, True)):
        if rows := [{"b_id": c.job_id, "b_worker": c.worker_id, "b_lease": c.lease_id, "b_seed": c.seed,
                     "b_censored": c.censored, "b_path": c.result_path, "b_now": now, "b_price": c.price}
                    for c in completions if c.late is late]:
            await conn.execute(statement, rows)
    rows = await held_jobs(conn, [c.job_id for c in completions])
    return {job_id: row for job_id, row in rows.items() if row.state == DONE}
