"""The claims service: grants the lease on a job (``grant``), to the dispatcher for a worker that
asked, to the HTTP bridge for a pop, and over AMQP (``claim.<worker>``, direct reply-to) to a
worker for a copy from its own queue, that is a job of a user its owner serves first (issue 5).

The grant is one conditional UPDATE (``queued -> claimed``), so of all the copies of a job that
may float in the queues (several models, own queues, republished duplicates) exactly one is ever
worked on. Over AMQP a worker can also give back a job (``decline``).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import sqlalchemy as sa
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api import job_store
from api.accounts import Account, WorkerDirectory, WorkerRecord, unavailability
from api.dispatch import publish_job
from api.jobs import CANCELLED, CLAIMED, DONE, FAULTED, QUEUED, job_lease_seconds, job_message
from api.metrics import observe_dispatch
from api.moderation import record_offence
from api.owner_priority import PriorityRoutes
from api.roles import RoleBook
from api.tables import jobs, unindexed, workers
from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import ClaimReply, ClaimRequest, JobMessage, decode
from config.database import as_utc, utcnow

log = logging.getLogger(__name__)

_DENIALS = {
    CLAIMED: "already claimed by another worker",
    DONE: "already done",
    FAULTED: "faulted",
    CANCELLED: "cancelled by the requester",
}


class ClaimsService:
    def __init__(self, engine: AsyncEngine, channel: aio_pika.abc.AbstractChannel, workers: WorkerDirectory,
                 *, lease_base_seconds: float, lease_step_seconds: float,
                 lease_min_seconds: float, roles: RoleBook | None = None,
                 publisher: Publisher | None = None, routes: PriorityRoutes | None = None) -> None:
        self._engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._publisher = publisher  # puts declined jobs back in their queue
        self._taken_back: dict[str, float] = {}  # job id -> when (monotonic) a decline last republished it
        self._roles = roles
        self._routes = routes  # who may claim over AMQP: the workers a job's copies were routed to
        self._channel = channel
        self._workers = workers
        self._lease_base = lease_base_seconds
        self._lease_step = lease_step_seconds
        self._lease_min = lease_min_seconds

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            request = decode(ClaimRequest, message.body, message.type)
        except BadMessage as exc:
            log.warning("malformed claim from %s: %s", message.user_id, exc)
            await message.reject(requeue=False)
            return
        try:
            reply = await self.decide(request, user_id=message.user_id, routing_key=message.routing_key or "")
        except (SQLAlchemyError, BrokerError, OSError) as exc:  # OSError: asyncpg's refused connections
            # No answer: the worker's claim times out and it asks again, holding the job.
            log.error("job %s: claim not decided, database error: %s", request.job_id, exc)
            reply = None
        if reply is not None and message.reply_to:
            await self._channel.default_exchange.publish(
                aio_pika.Message(reply.encode(), correlation_id=message.correlation_id, type=reply.schema_name,
                                 content_type="application/json"),
                routing_key=message.reply_to,
                mandatory=False,  # RabbitMQ 3.10 returns a mandatory publish to a direct reply-to even when delivered
            )
        await message.ack()

    async def decide(self, request: ClaimRequest, *, user_id: str | None, routing_key: str) -> ClaimReply:
        """Answer a claim that came over AMQP: authenticate the worker, then try to grant the lease."""
        worker = await self._workers.sender(request.worker, user_id=user_id, routing_key=routing_key)
        if worker is None:
            log.warning("job %s: claim refused, worker %r not registered or not authenticated as %r",
                        request.job_id, request.worker, user_id)
            await record_offence(self._engine, "forged_claim", {
                "job_id": request.job_id, "worker": request.worker, "routing_key": routing_key}, amqp_user=user_id)
            return ClaimReply(job_id=request.job_id, granted=False, reason="unknown or unauthenticated worker")
        if request.decline and request.lease_id:
            return await self.give_back(request.job_id, request.lease_id, worker)
        if request.decline:
            return await self.take_back(request.job_id, request.model, worker)
        return await self.grant(request.job_id, request.model, worker, own_queue=True)

    async def take_back(self, job_id: str, model: str, worker: WorkerRecord) -> ClaimReply:
        """``worker`` declined a job it received (it cannot do it, or may not have it now): put it back
        in the model's queue if it is still queued, and answer; the worker acks its delivery then.
        Workers never nack (issue 6), so the watchdog can count a non-acked delivery as a drop."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
        if row is None or row.state != QUEUED:
            return ClaimReply(job_id=job_id, granted=False, reason="declined; the job is not queued any more")
        if self._publisher is None or not self._may_take_back(job_id):
            # A flood of declines (a vandal) gets one copy per job each half second; the reconciler backs it up.
            return ClaimReply(job_id=job_id, granted=False, reason="declined; the reconciler republishes it")
        message = job_message(row)
        await publish_job(self._publisher, message, only=[model] if model in message.models else None)
        log.info("job %s: declined by %s, put back in the queue of %s", job_id, worker.name, model)
        return ClaimReply(job_id=job_id, granted=False, reason="declined; put back in the queue")

    async def give_back(self, job_id: str, lease_id: str, worker: WorkerRecord) -> ClaimReply:
        """``worker`` gives back a job it was offered and did not start (it is stopping, or the job
        does not fit after all): queued again and republished, no attempt spent."""
        async with self._engine.begin() as conn:
            row = await job_store.give_back(conn, job_id=job_id, lease_id=lease_id, worker_id=worker.id, now=utcnow())
        if row is None:
            return ClaimReply(job_id=job_id, granted=False, reason="given back; the lease was not current")
        if self._publisher is not None:
            await publish_job(self._publisher, job_message(row))
        log.info("job %s: given back unstarted by %s, queued again", job_id, worker.name)
        return ClaimReply(job_id=job_id, granted=False, reason="given back; queued again")

    def _may_take_back(self, job_id: str, *, interval: float = 0.5) -> bool:
        now = time.monotonic()
        if now - self._taken_back.get(job_id, float("-inf")) < interval:
            return False
        if len(self._taken_back) > 10_000:
            self._taken_back = {j: t for j, t in self._taken_back.items() if now - t < interval}
        self._taken_back[job_id] = now
        return True

    async def trusted(self, worker: WorkerRecord) -> bool:
        """Whether the worker's owner has the trusted role (cached by the role book)."""
        return self._roles is not None and "trusted" in await self._roles.roles(Account(worker.owner_id, ""))

    async def lease(self, picks: Sequence[tuple[JobMessage, str, WorkerRecord]], *,
                    max_leases: int) -> dict[str, ClaimReply]:
        """The dispatcher's fast path: lease each ``(job, model, worker)`` of a round, all in one
        transaction (one commit, however many). A pick applies only if the job is still queued and
        its worker in service and under ``max_leases``; the granted ones are returned by job id, and
        ``grant`` tells why the others were not. The dispatcher has already matched the jobs'
        models, limits and trust, and gives each job to at most one worker per round."""
        now = utcnow()
        rows = [self._lease_binds(job, model, worker, now=now, max_leases=max_leases) for job, model, worker in picks]
        if len(rows) == 1:  # an idle horde's round: one statement, one round trip, committed on its own
            async with self._autocommit.connect() as conn:
                hits = (await conn.execute(_LEASE_ONE, rows[0])).all()
        else:
            async with self._engine.begin() as conn:
                # executemany: one statement compiled once, the rows pipelined (a round's size varies)
                await conn.execute(_LEASE, rows)
                hits = (await conn.execute(_LEASED, {"ids": [r["b_job"] for r in rows]})).all()
        leased = {hit.lease_id: hit for hit in hits}
        granted: dict[str, ClaimReply] = {}
        for (job, _model, worker), row in zip(picks, rows, strict=True):
            if (hit := leased.get(row["b_lease"])) is not None:
                observe_dispatch(hit.published_at, now)  # GET /metrics: horde_dispatch_seconds
                log.info("job %s: leased to %s until %s", job.job_id, worker.name, as_utc(row["b_deadline"]))
                granted[job.job_id] = ClaimReply(job_id=job.job_id, granted=True, lease_id=row["b_lease"],
                                                 lease_deadline=row["b_deadline"])
        return granted

    async def insert_leased(self, conn: AsyncConnection, row: dict[str, Any], job: JobMessage, model: str,
                            worker: WorkerRecord, *, max_leases: int) -> ClaimReply | None:
        """Insert a new job already leased to ``worker`` (the dispatcher's door), in one statement, if
        the worker is in service and under ``max_leases``; None, and nothing inserted, if not."""
        now = utcnow()
        binds = self._lease_binds(job, model, worker, now=now, max_leases=max_leases)
        values = {k: v for k, v in row.items() if k not in _LEASE_COLUMNS}
        if (await conn.execute(_insert_leased(tuple(values)), {**values, **binds})).first() is None:
            return None
        observe_dispatch(row.get("published_at"), now)
        log.info("job %s: leased to %s at the door until %s", job.job_id, worker.name, as_utc(binds["b_deadline"]))
        return ClaimReply(job_id=job.job_id, granted=True, lease_id=binds["b_lease"],
                          lease_deadline=binds["b_deadline"])

    def _lease_binds(self, job: JobMessage, model: str, worker: WorkerRecord, *, now: datetime,
                     max_leases: int) -> dict[str, Any]:
        """The bind parameters of one lease (``_LEASE``, ``_insert_leased``)."""
        return {"b_job": job.job_id, "b_worker": worker.id, "b_lease": str(uuid.uuid4()), "b_model": model,
                "b_deadline": now + timedelta(seconds=self._lease_seconds(job.kind, job.params.model_dump())),
                "b_now": now, "b_max": max_leases}

    def _lease_seconds(self, kind: str, params: dict[str, Any]) -> float:
        return job_lease_seconds(kind, params, base=self._lease_base, per_step=self._lease_step,
                                 minimum=self._lease_min)

    async def grant(self, job_id: str, model: str, worker: WorkerRecord, *, max_leases: int | None = None,
                    own_queue: bool = False) -> ClaimReply:
        """Lease ``job_id`` to an authenticated ``worker`` serving ``model``, if it is still queued
        (and, with ``max_leases``, if the worker holds fewer live leases than that). ``own_queue``:
        a worker claims a copy from its own queue, so the job must be of a user it serves first;
        any other job it can only be given by the dispatcher (no cherry-picking by job id)."""
        async with self._engine.begin() as conn:
            if max_leases is not None and await _leases_held(conn, worker.id) >= max_leases:
                return ClaimReply(job_id=job_id, granted=False, requeue=True,
                                  reason=f"worker {worker.name} holds {max_leases} leases already")
            job = (await conn.execute(
                sa.select(jobs.c.state, jobs.c.kind, jobs.c.models, jobs.c.payload, jobs.c.published_at,
                          jobs.c.user_id)
                .where(jobs.c.id == job_id)
            )).first()
            if job is None:
                return ClaimReply(job_id=job_id, granted=False, reason="unknown job")
            if own_queue and (self._routes is None
                              or worker.name not in self._routes.workers_for(job.user_id, job.models)):
                return ClaimReply(job_id=job_id, granted=False, reason="not a job of a user this worker serves first")
            if job.state != QUEUED:
                return ClaimReply(job_id=job_id, granted=False, reason=_DENIALS.get(job.state, job.state))
            if job.models and model not in job.models:
                return ClaimReply(job_id=job_id, granted=False, requeue=True,
                                  reason=f"model {model} was not requested")
            why = await unavailability(conn, worker.id)
            if why is not None:  # requeued: another worker takes it
                return ClaimReply(job_id=job_id, granted=False, requeue=True, reason=f"worker {worker.name} is {why}")
            if job.payload.get("trusted_workers") and not await self.trusted(worker):
                # Dropped, not requeued: requeued, it would come straight back to the same untrusted
                # workers and block the queue behind it. The reconciler republishes it for the others.
                return ClaimReply(job_id=job_id, granted=False, reason="the requester asked for trusted workers only")
            now = utcnow()
            deadline = now + timedelta(seconds=self._lease_seconds(job.kind, job.payload["params"]))
            lease_id = str(uuid.uuid4())
            granted = await conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, unindexed(jobs.c.state) == QUEUED)
                .values(state=CLAIMED, worker_id=worker.id, lease_id=lease_id, lease_deadline=deadline,
                        claimed_at=now, model=model)
            )
        if granted.rowcount != 1:
            return ClaimReply(job_id=job_id, granted=False, reason=_DENIALS[CLAIMED])
        observe_dispatch(job.published_at, now)  # GET /metrics: horde_dispatch_seconds
        log.info("job %s: leased to %s until %s", job_id, worker.name, as_utc(deadline))
        return ClaimReply(job_id=job_id, granted=True, lease_id=lease_id, lease_deadline=deadline)


def _may_lease() -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    """Worker ``b_worker`` is in service, and holds fewer than ``b_max`` live leases."""
    mine = jobs.alias("mine")
    held = (sa.select(sa.func.count()).select_from(mine)
            .where(mine.c.worker_id == sa.bindparam("b_worker"), mine.c.state == CLAIMED).scalar_subquery())
    in_service = sa.exists().where(workers.c.id == sa.bindparam("b_worker"), workers.c.suspended_at.is_(None),
                                   workers.c.paused.is_(False), workers.c.maintenance.is_(False))
    return in_service, held < sa.bindparam("b_max")


#: What a lease writes on a job row, from which bind parameter.
_LEASE_VALUES = {"state": sa.literal(CLAIMED), "worker_id": sa.bindparam("b_worker"),
                 "lease_id": sa.bindparam("b_lease"), "lease_deadline": sa.bindparam("b_deadline"),
                 "claimed_at": sa.bindparam("b_now"), "model": sa.bindparam("b_model")}
_LEASE_COLUMNS = frozenset(_LEASE_VALUES)


def _lease_statement() -> sa.Update:
    """``queued -> claimed`` for one pick, if the worker may lease."""
    return (sa.update(jobs)
            .where(jobs.c.id == sa.bindparam("b_job"), unindexed(jobs.c.state) == QUEUED, *_may_lease())
            .values(**_LEASE_VALUES))


@functools.cache
def _insert_leased(columns: tuple[str, ...]) -> sa.Insert:
    """``INSERT … SELECT`` of a new row with its lease, if the worker may lease (one per row shape)."""
    values = [sa.bindparam(c, type_=jobs.c[c].type) for c in columns]
    leased = [sa.type_coerce(v, jobs.c[c].type) for c, v in _LEASE_VALUES.items()]
    return (sa.insert(jobs)
            .from_select([*columns, *_LEASE_VALUES], sa.select(*values, *leased).where(*_may_lease()))
            .returning(jobs.c.id))


#: Built once: building it per call (the alias, the subquery) showed in the dispatcher's profile.
_LEASE = _lease_statement()
_LEASE_ONE = _LEASE.returning(jobs.c.lease_id, jobs.c.published_at)
#: By job id (the primary key): which picks of a round got their lease (lease ids are not indexed).
_LEASED = sa.select(jobs.c.lease_id, jobs.c.published_at).where(jobs.c.id.in_(sa.bindparam("ids", expanding=True)))


async def _leases_held(conn: AsyncConnection, worker_id: int) -> int:
    held = await conn.execute(sa.select(sa.func.count()).select_from(jobs)
                              .where(jobs.c.worker_id == worker_id, jobs.c.state == CLAIMED))
    return int(held.scalar_one())
