"""The results service: accepts workers' completions, stores results, and tells the ledger.

A completion counts only if it is authentic (the broker-validated ``user_id`` is the AMQP user of
the worker named in the routing key and body) and current (that worker holds the job's live
lease). Then the image (or text) is stored, the job moves to ``done`` and a trusted ``job.done``
event is published for the ledger. A text job is settled on the text it returned
(``ledger.pricing``), at most its quote. The worker's message is acked only after all of that, so a crash at
any point means a redelivery, which finds the job already done and re-announces it: the ledger
dedupes, so the job is settled exactly once.

Completions that arrive together are processed as a group (``api.grouping``): their files written
in one thread hop, their jobs moved to ``done`` in one transaction (``job_store.complete_many``),
their ``job.done`` events announced in one ``jobs-done.v1`` message (one publish, confirm and
ledger delivery for the group); each worker's message is acked once that announcement is
confirmed, and a database or broker error sends the whole group back.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.engine import Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api import job_store
from api.accounts import WorkerDirectory, WorkerRecord
from api.dispatch import publish_job
from api.grouping import Groups
from api.jobs import QUEUED, job_megapixelsteps, job_message
from api.moderation import record_offence
from api.result_store import ResultStore
from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import (
    MAX_EVENTS_PER_JOBS_DONE,
    JobCompleted,
    JobDone,
    JobFaulted,
    JobsCompleted,
    JobsDone,
    decode,
)
from broker.topology import EVENTS_EXCHANGE, JOB_DONE_KEY, worker_of
from config.database import as_utc, utcnow
from ledger.pricing import billed_tokens, text_kudos
from ledger.units import to_kudos, to_units

log = logging.getLogger(__name__)

#: A group's size bound: one SELECT, one UPDATE and one ``jobs-done.v1`` message for up to this many.
MAX_COMPLETIONS_PER_GROUP = MAX_EVENTS_PER_JOBS_DONE

_NOT_HELD = "it does not hold the live lease"
#: Its lease expired and another worker has the job now: an honest worker, too slow; no strike.
_LATE = "late: its lease expired and the job went to another worker"


@dataclass
class _Pending:
    """One authenticated completion waiting for its group; ``outcome`` is :meth:`ResultsService.complete`'s."""
    event: JobCompleted
    worker: WorkerRecord
    outcome: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def kind(self) -> str:
        return "text" if self.event.text is not None else "image"

    @property
    def data(self) -> bytes:
        return self.event.text.encode("utf-8") if self.event.text is not None else self.event.image or b""


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
        self._groups: Groups[_Pending] = Groups(self._flush, max_size=MAX_COMPLETIONS_PER_GROUP)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            events = _decode(message)
        except BadMessage as exc:
            log.warning("rejected a malformed result from %s: %s", message.user_id, exc)
            await message.reject(requeue=False)
            return
        name, jobs = events[0].worker, ", ".join(e.job_id for e in events)  # one worker's (JobsCompleted)
        try:
            worker = await self._workers.get(name)
        except (SQLAlchemyError, OSError) as exc:  # uncaught, the delivery would stay unacked forever
            log.error("job %s: result not processed yet (%s); it will be redelivered", jobs, exc)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        if not _authentic(worker, message, name):
            log.warning("job %s: rejected a result claiming worker %r from AMQP user %r (key %s)",
                        jobs, name, message.user_id, message.routing_key)
            first, *more = events  # one forgery, one offence, however many it names
            await self._offence("forged_completion", {
                "job_id": first.job_id, "lease_id": first.lease_id, "worker": name,
                "routing_key": message.routing_key, **({"more_jobs": [e.job_id for e in more]} if more else {})},
                amqp_user=message.user_id)
            await message.reject(requeue=False)
            return
        assert worker is not None
        try:
            # Several completions join the same group; any error sends the message back whole (a
            # completion that counted is found done by its lease when redelivered, and re-announced).
            await asyncio.gather(*(self.complete(e, worker) if isinstance(e, JobCompleted) else self.fault(e, worker)
                                   for e in events))
        except (SQLAlchemyError, BrokerError, OSError) as exc:
            log.error("job %s: result not processed yet (%s); it will be redelivered", jobs, exc)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        await message.ack()

    async def complete(self, event: JobCompleted, worker: WorkerRecord) -> bool:
        """Accept an authenticated worker's result; False if it does not hold the job's live lease
        (or sent a result of the wrong kind: an image for a text job, or the reverse).

        Returns once the job is ``done`` and its ``job.done`` confirmed by the broker; raises the
        database, broker or disk error otherwise (the caller retries: it is idempotent). Concurrent
        completions are processed together (see :meth:`_process_group`), so this is the one path.
        """
        pending = _Pending(event, worker)
        self._groups.add(pending)
        return await pending.outcome

    async def _flush(self, group: list[_Pending]) -> None:
        try:
            try:
                verdicts = await self._process_group(group)
            except (SQLAlchemyError, OSError) as exc:  # nothing announced: every message is redelivered
                for pending in group:
                    _settle(pending, error=exc)
                return
            done = [(p, v) for p, v in zip(group, verdicts, strict=True) if not isinstance(v, str)]
            refused = [(p, v) for p, v in zip(group, verdicts, strict=True) if isinstance(v, str)]
            await asyncio.gather(self._announce(done), *(self._refuse(p, why) for p, why in refused))
        except Exception as exc:  # a bug must not leave the deliveries waiting forever
            for pending in group:
                _settle(pending, error=exc)
            raise
        finally:
            for pending in group:  # cancelled (shutdown): the waiting handlers give up too
                if not pending.outcome.done():
                    pending.outcome.cancel()

    async def _process_group(self, group: list[_Pending]) -> list[Row | str]:
        """Store a group's results (one thread hop) and move its current jobs to ``done`` in one
        transaction; per completion, its done row (also on a repeat) or why it was refused."""
        # Keyed by lease, so a stale or forged completion can never overwrite a real result.
        paths = await asyncio.to_thread(
            self._store.put_many, [(f"{p.event.job_id}-{p.event.lease_id}", p.data) for p in group])
        refusals: list[str | None] = []  # None: may count, if its lease is still current
        async with self._engine.begin() as conn:
            held = await job_store.held_jobs(conn, sorted({p.event.job_id for p in group}))
            current: dict[str, job_store.Completion] = {}  # one UPDATE row per job, even if sent twice
            for pending, path in zip(group, paths, strict=True):
                refusals.append(_refusal(pending, held.get(pending.event.job_id)))
                if refusals[-1] is None and pending.event.job_id not in current:
                    current[pending.event.job_id] = _done_values(pending, held[pending.event.job_id], path)
            # Done now, or already by this lease (a redelivery: announced again), or not current any more.
            done = await job_store.complete_many(conn, [current[k] for k in sorted(current)], utcnow())
        verdicts: list[Row | str] = []
        for pending, refusal in zip(group, refusals, strict=True):
            row = done.get(pending.event.job_id)
            late = pending.event.job_id in current and current[pending.event.job_id].late
            verdicts.append(refusal or (row if row is not None and _holds(row, pending)
                                        else _LATE if late else _NOT_HELD))
        return verdicts

    async def _refuse(self, pending: _Pending, why: str) -> None:
        """Release a completion that did not count; one from a worker that no longer held the
        job's lease is struck, unless it was merely late."""
        event, worker = pending.event, pending.worker
        if why == _LATE:
            log.info("job %s: result from %s ignored: %s", event.job_id, worker.name, why)
        else:
            log.warning("job %s: completion from %s ignored: %s", event.job_id, worker.name, why)
            await self._offence("stale_completion", {"job_id": event.job_id, "lease_id": event.lease_id,
                                                     "worker": worker.name, "why": why}, worker_id=worker.id)
        _settle(pending, accepted=False)

    async def _offence(self, kind: str, detail: dict[str, object], *, worker_id: int | None = None,
                       amqp_user: str | None = None) -> None:
        """Log a refused completion for moderators and count it against its sender; never paid."""
        try:
            struck = await record_offence(self._engine, kind, detail, worker_id=worker_id, amqp_user=amqp_user)
        except SQLAlchemyError as exc:
            log.error("could not record %s %s: %s", kind, detail, exc)
            return
        log.warning("%s recorded (worker id %s struck)", kind, struck)

    async def _announce(self, done: list[tuple[_Pending, Row]]) -> None:
        """Publish the ``job.done`` events of a group's done jobs as one ``jobs-done.v1`` message,
        wait for the broker's confirm, then release their deliveries (redelivered on an error)."""
        events: dict[str, JobDone] = {}  # a job completed twice in the group is announced once
        for pending, row in done:
            event = pending.event
            log.info("job %s: done by %s in %.2fs", event.job_id, pending.worker.name, event.generation_seconds)
            self.average_seconds = 0.9 * self.average_seconds + 0.1 * event.generation_seconds
            events[row.id] = _done_event(row, pending.worker, event.text)
        try:
            if events:  # at most MAX_COMPLETIONS_PER_GROUP: one message holds them all
                await self._publisher.publish(EVENTS_EXCHANGE, JOB_DONE_KEY, JobsDone(events=list(events.values())),
                                              message_id=f"jobs-done:{uuid.uuid4().hex}")
        except (BrokerError, OSError) as exc:
            for pending, _ in done:
                _settle(pending, error=exc)
            return
        for pending, _ in done:
            _settle(pending, accepted=True)

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


def _done_event(row: Row, worker: WorkerRecord, text: str | None) -> JobDone:
    """The ledger's event for a done job. ``text`` is what was just stored at ``row.result_path``
    (the path is keyed by job and lease), so it is not read back."""
    tokens = 0
    if row.kind == "text":
        tokens = billed_tokens(text=text or "", max_length=row.payload["params"]["max_length"])
    return JobDone(
        job_id=row.id, request_id=row.request_id, requester_id=row.user_id, worker_id=worker.id,
        worker_owner_id=worker.owner_id, worker_name=worker.name, model=row.model or "", kind=row.kind,
        kudos=to_kudos(row.price), megapixelsteps=job_megapixelsteps(row.payload), tokens=tokens,
        finished_at=as_utc(row.finished_at),
    )


def _holds(row: Row, pending: _Pending) -> bool:
    """Whether ``row`` is (or was, for a done job) leased to this completion's worker and lease."""
    return row.worker_id == pending.worker.id and row.lease_id == pending.event.lease_id


def _held_before(row: Row, pending: _Pending) -> bool:
    """Whether ``row`` was taken back from this completion's worker and lease (the lease expired)."""
    return row.expired_worker_id == pending.worker.id and row.expired_lease_id == pending.event.lease_id


def _refusal(pending: _Pending, held: Row | None) -> str | None:
    """Why a completion cannot count, judged on its job's row; None if it may (if still current,
    or, late, if nobody has taken the job since)."""
    if held is None:
        return _NOT_HELD
    if not _holds(held, pending):
        if not _held_before(held, pending):
            return _NOT_HELD
        if held.state != QUEUED:
            return _LATE
    if held.kind != pending.kind:
        return f"a {pending.kind} result for a {held.kind} job"
    return None


def _done_values(pending: _Pending, held: Row, path: str) -> job_store.Completion:
    event = pending.event
    return job_store.Completion(
        job_id=event.job_id, worker_id=pending.worker.id, lease_id=event.lease_id, seed=event.seed,
        censored=event.state == "censored", result_path=path,
        price=_text_price(held, event.text) if event.text is not None else None, late=not _holds(held, pending))


def _settle(pending: _Pending, *, accepted: bool = False, error: BaseException | None = None) -> None:
    """Resolve a completion's outcome once (its handler may have been cancelled meanwhile)."""
    if pending.outcome.done():
        return
    if error is not None:
        pending.outcome.set_exception(error)
    else:
        pending.outcome.set_result(accepted)


def _text_price(job: Row, text: str) -> int:
    """A text job's price on the text it returned, for the model that served it; never above the
    quote the requester was given."""
    params, sizes = job.payload["params"], job.payload.get("parameters_b") or {}
    parameters_b = sizes.get(job.model, max(sizes.values(), default=0.0))
    kudos = text_kudos(tokens=billed_tokens(text=text, max_length=params["max_length"]), parameters_b=parameters_b,
                       max_context_length=params["max_context_length"])
    return min(job.price, to_units(kudos))


def _decode(message: AbstractIncomingMessage) -> list[JobCompleted] | list[JobFaulted]:
    """The completions (or the fault) a worker's message carries, all of one worker."""
    if message.type == JobCompleted.schema_name:
        return [decode(JobCompleted, message.body, message.type)]
    if message.type == JobsCompleted.schema_name:
        return decode(JobsCompleted, message.body, message.type).completions
    if message.type == JobFaulted.schema_name:
        return [decode(JobFaulted, message.body, message.type)]
    raise BadMessage(f"unexpected message type {message.type!r}")


def _authentic(worker: WorkerRecord | None, message: AbstractIncomingMessage, claimed_name: str) -> bool:
    """The broker validated user_id; it must be this worker's, and the routing key must end with its name."""
    return (
        worker is not None
        and message.user_id is not None
        and message.user_id == worker.amqp_user
        and worker_of(message.routing_key or "") == claimed_name
    )
