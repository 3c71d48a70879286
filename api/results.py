"""The results service: accepts workers' completions, stores results, and tells the ledger.

A completion counts only if it is authentic (the broker-validated ``user_id`` is the AMQP user of
the worker named in the routing key and body) and current (that worker holds the job's live
lease). Then the image (or text) is stored, the job moves to ``done`` and a trusted ``job.done``
event is published for the ledger. A text job is settled on the text it returned
(``ledger.pricing``), at most its quote. The worker's message is acked only after all of that, so a crash at
any point means a redelivery, which finds the job already done and re-announces it: the ledger
dedupes, so the job is settled exactly once.
"""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.engine import Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api import job_store
from api.accounts import WorkerDirectory, WorkerRecord
from api.moderation import record_offence
from api.dispatch import publish_job
from api.jobs import QUEUED, job_megapixelsteps, job_message
from api.result_store import ResultStore
from api.tables import jobs
from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import JobCompleted, JobDone, JobFaulted, decode
from broker.topology import EVENTS_EXCHANGE, JOB_DONE_KEY, worker_of
from config.database import as_utc, utcnow
from ledger.pricing import billed_tokens, text_kudos
from ledger.units import to_kudos, to_units

log = logging.getLogger(__name__)


class ResultsService:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, workers: WorkerDirectory, store: ResultStore,
                 *, max_attempts: int) -> None:
        self._engine = engine
        self._publisher = publisher
        self._workers = workers
        self._store = store
        self._max_attempts = max_attempts
        #: Moving average of generation time, for wait estimates.
        self.average_seconds = 5.0

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            event = _decode(message)
        except BadMessage as exc:
            log.warning("rejected a malformed result from %s: %s", message.user_id, exc)
            await message.reject(requeue=False)
            return
        try:
            worker = await self._workers.get(event.worker)
        except (SQLAlchemyError, OSError) as exc:  # uncaught, the delivery would stay unacked forever
            log.error("job %s: result not processed yet (%s); it will be redelivered", event.job_id, exc)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        if not _authentic(worker, message, event.worker):
            log.warning("job %s: rejected a result claiming worker %r from AMQP user %r (key %s)",
                        event.job_id, event.worker, message.user_id, message.routing_key)
            await self._offence("forged_completion", {
                "job_id": event.job_id, "lease_id": event.lease_id, "worker": event.worker,
                "routing_key": message.routing_key}, amqp_user=message.user_id)
            await message.reject(requeue=False)
            return
        assert worker is not None
        try:
            if isinstance(event, JobCompleted):
                await self.complete(event, worker)
            else:
                await self.fault(event, worker)
        except (SQLAlchemyError, BrokerError, OSError) as exc:
            log.error("job %s: result not processed yet (%s); it will be redelivered", event.job_id, exc)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        await message.ack()

    async def complete(self, event: JobCompleted, worker: WorkerRecord) -> bool:
        """Accept an authenticated worker's result; False if it does not hold the job's live lease
        (or sent a result of the wrong kind: an image for a text job, or the reverse)."""
        kind = "text" if event.text is not None else "image"
        data = event.text.encode("utf-8") if event.text is not None else event.image or b""
        # Keyed by lease, so a stale or forged completion can never overwrite a real result.
        path = await asyncio.to_thread(self._store.put, f"{event.job_id}-{event.lease_id}", data)
        async with self._engine.begin() as conn:
            held = (await conn.execute(
                sa.select(jobs.c.kind, jobs.c.model, jobs.c.payload, jobs.c.price)
                .where(jobs.c.id == event.job_id, jobs.c.worker_id == worker.id, jobs.c.lease_id == event.lease_id)
            )).first()
            row = None
            if held is not None and held.kind == kind:
                row = await job_store.complete(
                    conn, job_id=event.job_id, worker_id=worker.id, lease_id=event.lease_id, seed=event.seed,
                    censored=event.state == "censored", result_path=path, now=utcnow(),
                    price=_text_price(held, event.text) if event.text is not None else None)
        if row is None:
            why = f"a {kind} result for a {held.kind} job" if held is not None and held.kind != kind \
                else "it does not hold the live lease"
            log.warning("job %s: completion from %s ignored: %s", event.job_id, worker.name, why)
            await self._offence("stale_completion", {"job_id": event.job_id, "lease_id": event.lease_id,
                                                     "worker": worker.name, "why": why}, worker_id=worker.id)
            return False
        log.info("job %s: done by %s in %.2fs", event.job_id, worker.name, event.generation_seconds)
        self.average_seconds = 0.9 * self.average_seconds + 0.1 * event.generation_seconds
        await self._announce(row, worker)
        return True

    async def _offence(self, kind: str, detail: dict[str, object], *, worker_id: int | None = None,
                       amqp_user: str | None = None) -> None:
        """Log a refused completion for moderators and count it against its sender; never paid."""
        try:
            struck = await record_offence(self._engine, kind, detail, worker_id=worker_id, amqp_user=amqp_user)
        except SQLAlchemyError as exc:
            log.error("could not record %s %s: %s", kind, detail, exc)
            return
        log.warning("%s recorded (worker id %s struck)", kind, struck)

    async def _announce(self, row: Row, worker: WorkerRecord) -> None:
        tokens = 0
        if row.kind == "text":
            text = (await asyncio.to_thread(self._store.get, row.result_path) or b"").decode("utf-8", "replace")
            tokens = billed_tokens(text=text, max_length=row.payload["params"]["max_length"])
        done = JobDone(
            job_id=row.id, request_id=row.request_id, requester_id=row.user_id, worker_id=worker.id,
            worker_owner_id=worker.owner_id, worker_name=worker.name, model=row.model or "", kind=row.kind,
            kudos=to_kudos(row.price), megapixelsteps=job_megapixelsteps(row.payload), tokens=tokens,
            finished_at=as_utc(row.finished_at),
        )
        await self._publisher.publish(EVENTS_EXCHANGE, JOB_DONE_KEY, done, message_id=f"job-done:{row.id}")

    async def fault(self, event: JobFaulted, worker: WorkerRecord) -> None:
        """A worker gave a job back: requeue it, or fault it after max_attempts."""
        async with self._engine.begin() as conn:
            row = await job_store.release(
                conn, job_id=event.job_id, lease_id=event.lease_id, worker_id=worker.id,
                max_attempts=self._max_attempts, reason=f"{worker.name}: {event.reason}", now=utcnow())
        if row is None:
            return
        log.warning("job %s: faulted on %s (%s); now %s", event.job_id, worker.name, event.reason, row.state)
        if row.state == QUEUED:
            await publish_job(self._publisher, job_message(row))


def _text_price(job: Row, text: str) -> int:
    """A text job's price on the text it returned, for the model that served it; never above the
    quote the requester was given."""
    params, sizes = job.payload["params"], job.payload.get("parameters_b") or {}
    parameters_b = sizes.get(job.model, max(sizes.values(), default=0.0))
    kudos = text_kudos(tokens=billed_tokens(text=text, max_length=params["max_length"]), parameters_b=parameters_b,
                       max_context_length=params["max_context_length"])
    return min(job.price, to_units(kudos))


def _decode(message: AbstractIncomingMessage) -> JobCompleted | JobFaulted:
    if message.type == JobCompleted.schema_name:
        return decode(JobCompleted, message.body, message.type)
    if message.type == JobFaulted.schema_name:
        return decode(JobFaulted, message.body, message.type)
    raise BadMessage(f"unexpected message type {message.type!r}")


def _authentic(worker: WorkerRecord | None, message: AbstractIncomingMessage, claimed_name: str) -> bool:
    """The broker validated user_id; it must be this worker's, and the routing key must end with its name."""
    return (
        worker is not None
        and message.user_id is not None
        and message.user_id == worker.amqp_user
        and worker_of(message.routing_key or "") == claimed_name
    )
