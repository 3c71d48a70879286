"""Workers that poll over HTTP (AI Horde's ``/generate/pop`` and ``/generate/submit``), bridged onto the queues.

An HTTP worker is its owner's API key plus a worker name: a new name registers a worker for that
owner at its first pop (as on AI Horde); a name another user owns is refused. Its
``amqp_user`` is the sentinel ``http:``, so no AMQP message is ever accepted as coming from it.

A pop takes jobs from the same per-model priority queues the dispatcher serves AMQP workers
from, with ``basic.get`` on one channel the API shares between all HTTP workers, and leases them through
the same claims service:

    get ── malformed ──────────────────────────► reject (dead-lettered)
        ── the worker can't take it (size, nsfw, blacklist) ► hold; nack (requeue) after the pop
        ── claim granted ──────────────────────► ack, answer the job
        ── claim denied (done, cancelled, claimed: a stale copy) ► ack (dropped)

Held messages are nacked only when the pop ends, so one pop looks past the jobs it skips
instead of getting the same one back; requeued messages keep their place. A submit completes
the lease through the results service, exactly as an AMQP completion: stored, ``done``, settled
by the ledger once. A lease that expired meanwhile answers ``AbortedGen``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
import sqlalchemy as sa
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from PIL import Image, UnidentifiedImageError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api.accounts import (
    Account,
    WorkerDirectory,
    WorkerRecord,
    create_http_worker,
    http_worker_name,
    unavailability,
)
from api.claims import ClaimsService
from api.errors import (
    AbortedGen,
    BadRequest,
    DuplicateGen,
    InvalidJobID,
    ServiceUnavailable,
    WrongCredentials,
)
from api.jobs import CLAIMED, DONE
from api.results import ResultsService
from api.tables import jobs, workers
from api.uptime import UptimeService
from broker.errors import BadMessage, BrokerError
from broker.messages import ClaimReply, JobCompleted, JobFaulted, JobMessage, WorkerHeartbeat, decode
from broker.topology import job_queue
from config import ModelKind, ModelReference
from config.database import as_utc, utcnow
from ledger.units import to_kudos

log = logging.getLogger(__name__)

#: Messages one pop looks at in one model's queue before moving on (AI Horde pages by 10).
SCAN_PER_QUEUE = 20
#: A worker's record (models, max_pixels, last seen...) is written at most this often unless it changes.
TOUCH_EVERY_SECONDS = 30.0
WEBP_QUALITY = 90


@dataclass(frozen=True)
class ImageOffer:
    """What an HTTP image worker says it can do, from its pop request."""

    models: tuple[str, ...]
    max_pixels: int
    nsfw: bool
    blacklist: tuple[str, ...]
    threads: int
    bridge_agent: str
    allow_img2img: bool = True
    allow_painting: bool = False

    def skip_reason(self, job: JobMessage) -> str | None:
        """Why this worker cannot take ``job`` (AI Horde's ``skipped`` keys), or None."""
        params = job.params
        if params.width * params.height > self.max_pixels:  # type: ignore[union-attr]
            return "max_pixels"
        if job.nsfw and not self.nsfw:
            return "nsfw"
        processing = getattr(job, "source_processing", "txt2img")
        if processing == "img2img" and not self.allow_img2img:
            return "img2img"
        if processing not in ("txt2img", "img2img") and not self.allow_painting:
            return "painting"
        prompt = job.prompt.lower()
        if any(word and word.lower() in prompt for word in self.blacklist):
            return "blacklist"
        return None


@dataclass(frozen=True)
class TextOffer:
    """What an HTTP text worker says it can do, from its pop request."""

    models: tuple[str, ...]
    max_length: int
    max_context_length: int
    blacklist: tuple[str, ...]
    threads: int
    bridge_agent: str
    nsfw: bool = True  # recorded; text requests cannot say they are safe for work, so no job is skipped for it
    max_pixels: int | None = None

    def skip_reason(self, job: JobMessage) -> str | None:
        params = job.params
        if params.max_length > self.max_length:  # type: ignore[union-attr]
            return "max_length"
        if params.max_context_length > self.max_context_length:  # type: ignore[union-attr]
            return "max_context_length"
        prompt = job.prompt.lower()
        if any(word and word.lower() in prompt for word in self.blacklist):
            return "blacklist"
        return None


Offer = ImageOffer | TextOffer
_KINDS = {ImageOffer: ModelKind.image, TextOffer: ModelKind.text}


@dataclass(frozen=True)
class Popped:
    job: JobMessage
    model: str
    reply: ClaimReply


class JobBridge:
    def __init__(self, *, engine: AsyncEngine, connection: aio_pika.abc.AbstractRobustConnection,
                 claims: ClaimsService, results: ResultsService, workers: WorkerDirectory,
                 models: ModelReference, uptime: UptimeService | None = None) -> None:
        self._engine = engine
        self._connection = connection
        self._claims = claims
        self._results = results
        self._workers = workers
        self._models = models
        self._uptime = uptime
        self._channel: AbstractChannel | None = None
        self._opening = asyncio.Lock()
        self._touched: dict[int, tuple[float, tuple[Any, ...]]] = {}

    # --- who is asking ---------------------------------------------------------------------

    async def worker(self, owner: Account, name: str, *, kind: str = "image") -> WorkerRecord:
        """The worker ``name`` of ``owner``, registered now if the name is new."""
        try:
            name = http_worker_name(name)
        except ValueError as exc:
            raise BadRequest(str(exc), rc="InvalidWorkerName") from exc
        record = await self._workers.get(name)
        if record is None:
            record = await self._register(owner, name, kind)
        if record.owner_id != owner.id:
            raise WrongCredentials(f"Worker {name!r} belongs to another user: pick another name.")
        return record

    async def _register(self, owner: Account, name: str, kind: str) -> WorkerRecord:
        try:
            async with self._engine.begin() as conn:
                record = await conn.run_sync(lambda c: create_http_worker(c, name, owner=owner, kind=kind))
        except IntegrityError:  # registered meanwhile by a concurrent pop
            record = await self._workers.get(name, fresh=True)
            if record is None:
                raise
        else:
            log.info("registered HTTP worker %r (id %d) for %s", name, record.id, owner.username)
        self._workers.remember(record)
        return record

    async def touch(self, worker: WorkerRecord, offer: Offer) -> None:
        """Record that the worker polled and what it offers (throttled: a write per 30 s unless it changed).

        A poll is an HTTP worker's heartbeat, as on AI Horde: it extends the worker's uptime streak,
        whose completed intervals the uptime service pays to the owner (as for an AMQP heartbeat).
        """
        kind = _KINDS[type(offer)].value
        values = (kind, sorted(offer.models), offer.bridge_agent[:1000], offer.max_pixels, offer.nsfw, offer.threads)
        last = self._touched.get(worker.id)
        now = time.monotonic()
        if last and last[1] == values and now - last[0] < TOUCH_EVERY_SECONDS:
            return
        try:
            async with self._engine.begin() as conn:
                await conn.execute(sa.update(workers).where(workers.c.id == worker.id).values(
                    kind=kind, models=values[1], bridge_agent=values[2], max_pixels=offer.max_pixels,
                    nsfw=offer.nsfw, threads=offer.threads, last_seen_at=utcnow()))
            if self._uptime is not None:
                at = utcnow()
                await self._uptime.record(worker, WorkerHeartbeat(
                    worker=worker.name, models=list(values[1]), state="idle", nsfw=offer.nsfw,
                    max_pixels=offer.max_pixels or 0, sent_at=at), at=at)
        except (SQLAlchemyError, BrokerError) as exc:  # bookkeeping only: the pop goes on
            log.warning("could not record the check-in of worker %s: %s", worker.name, exc)
            return
        self._touched[worker.id] = (now, values)

    # --- pop ---------------------------------------------------------------------------------

    async def _open(self) -> AbstractChannel:
        async with self._opening:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel()
            return self._channel

    def served_models(self, requested: tuple[str, ...], kind: ModelKind) -> list[str]:
        return [m for m in dict.fromkeys(requested)
                if (spec := self._models.get(m)) is not None and spec.kind == kind]

    async def pop(self, worker: WorkerRecord, offer: Offer) -> tuple[Popped | None, Counter[str]]:
        """Lease the first job this worker can take from its models' queues, in each queue's priority order."""
        skipped: Counter[str] = Counter()
        models = self.served_models(offer.models, _KINDS[type(offer)])
        if not models or await self._unavailable(worker):
            return None, skipped
        held: list[AbstractIncomingMessage] = []
        try:
            channel = await self._open()
            for model in models:
                queue = await channel.get_queue(job_queue(model), ensure=False)
                for _ in range(SCAN_PER_QUEUE):
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    popped = await self._consider(message, model, worker, offer, skipped, held)
                    if popped is not None:
                        return popped, skipped
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError,
                asyncio.TimeoutError) as exc:
            raise ServiceUnavailable("The message broker is unavailable. Retry shortly.",
                                     rc="BrokerUnavailable") from exc
        finally:
            await _requeue(held)
        return None, skipped

    async def _unavailable(self, worker: WorkerRecord) -> bool:
        """Paused, in maintenance or suspended: no job (read fresh, so a pause applies at the next pop)."""
        try:
            async with self._engine.connect() as conn:
                why = await unavailability(conn, worker.id)
        except SQLAlchemyError as exc:
            raise ServiceUnavailable("The database is unavailable. Retry shortly.", rc="DatabaseUnavailable") from exc
        if why is not None:
            log.info("HTTP worker %s is %s: no job for it", worker.name, why)
        return why is not None

    async def _consider(self, message: AbstractIncomingMessage, model: str, worker: WorkerRecord, offer: Offer,
                        skipped: Counter[str], held: list[AbstractIncomingMessage]) -> Popped | None:
        try:
            job = decode(JobMessage, message.body, message.type)
        except BadMessage as exc:
            log.warning("message %s in %s is malformed, dead-lettering it: %s", message.message_id, model, exc)
            await message.reject(requeue=False)
            return None
        if job.kind != _KINDS[type(offer)].value:
            log.warning("job %s: a %s job in %s's queue; dead-lettering it", job.job_id, job.kind, model)
            await message.reject(requeue=False)
            return None
        reason = offer.skip_reason(job)
        if reason is not None:
            skipped[reason] += 1
            held.append(message)
            return None
        try:
            reply = await self._claims.grant(job.job_id, model, worker)
        except SQLAlchemyError as exc:
            held.append(message)
            raise ServiceUnavailable("The database is unavailable. Retry shortly.", rc="DatabaseUnavailable") from exc
        if reply.granted:
            await _settle(message.ack())
            return Popped(job, model, reply)
        if reply.requeue:
            skipped["models"] += 1
            held.append(message)
        else:
            await _settle(message.ack())  # a stale copy: the job is done, cancelled or leased elsewhere
        return None

    # --- submit ------------------------------------------------------------------------------

    async def submit_image(self, owner: Account, job_id: str, *, generation: str, state: str, seed: str,
                           censored: bool) -> float:
        """Complete (or fault) the lease ``owner``'s worker holds on ``job_id``; the kudos it earns."""
        row, worker = await self._lease_of(owner, job_id)
        if state == "faulted":
            await self._results.fault(JobFaulted(job_id=job_id, lease_id=row.lease_id, worker=worker.name,
                                                 reason="the worker reported the generation faulted"), worker)
            return 0.0
        image, width, height = await asyncio.to_thread(as_webp, generation)
        claimed_at = as_utc(row.claimed_at)
        seconds = max(0.0, (utcnow() - claimed_at).total_seconds()) if claimed_at else 0.0
        event = JobCompleted(
            job_id=job_id, lease_id=row.lease_id, worker=worker.name, model=row.model or "", seed=seed,
            state="censored" if censored or state in ("censored", "csam") else "ok", image=image,
            width=width, height=height, generation_seconds=seconds)
        await self._complete(event, worker)
        return to_kudos(row.price)

    async def submit_text(self, owner: Account, job_id: str, *, generation: str, state: str) -> float:
        """Complete (or fault) the lease ``owner``'s worker holds on text job ``job_id``; the kudos it earns
        (a text job is priced on the text it returned)."""
        row, worker = await self._lease_of(owner, job_id, "text")
        if state == "faulted":
            await self._results.fault(JobFaulted(job_id=job_id, lease_id=row.lease_id, worker=worker.name,
                                                 reason="the worker reported the generation faulted"), worker)
            return 0.0
        claimed_at = as_utc(row.claimed_at)
        event = JobCompleted(
            job_id=job_id, lease_id=row.lease_id, worker=worker.name, model=row.model or "",
            seed=str(row.payload["params"].get("seed") or 0), state="censored" if state == "censored" else "ok",
            text=generation, media_type="text/plain",
            generation_seconds=max(0.0, (utcnow() - claimed_at).total_seconds()) if claimed_at else 0.0)
        await self._complete(event, worker)
        async with self._engine.connect() as conn:
            price = (await conn.execute(sa.select(jobs.c.price).where(jobs.c.id == job_id))).scalar_one()
        return to_kudos(price)

    async def _complete(self, event: JobCompleted, worker: WorkerRecord) -> None:
        try:
            accepted = await self._results.complete(event, worker)
        except (SQLAlchemyError, BrokerError, OSError) as exc:
            raise ServiceUnavailable("The result could not be stored yet. Submit it again.",
                                     rc="ServiceUnavailable") from exc
        if not accepted:
            raise AbortedGen("This job's lease expired before the result came: it went to another worker.")

    async def _lease_of(self, owner: Account, job_id: str, kind: str = "image") -> tuple[Any, WorkerRecord]:
        """The job row and the lease holder, if that is one of ``owner``'s workers; else the AI Horde error."""
        try:
            uuid.UUID(job_id)
        except ValueError:
            raise InvalidJobID(f"No job with id {job_id[:100]!r}.") from None
        async with self._engine.connect() as conn:
            row = (await conn.execute(
                sa.select(jobs.c.state, jobs.c.kind, jobs.c.worker_id, jobs.c.lease_id, jobs.c.model, jobs.c.price,
                          jobs.c.claimed_at, jobs.c.payload).where(jobs.c.id == job_id))).first()
        if row is None or row.kind != kind:
            raise InvalidJobID(f"No {kind} job with id {job_id}.")
        holder = (await self._workers.by_id({row.worker_id})).get(row.worker_id) if row.worker_id else None
        ours = holder is not None and holder.owner_id == owner.id
        if row.state == CLAIMED and ours:
            assert holder is not None
            return row, holder
        if row.state in (CLAIMED, DONE) and not ours:
            raise WrongCredentials("This job is not held by a worker of yours.")
        if row.state == DONE:
            raise DuplicateGen("This job was already submitted.")
        raise AbortedGen("This job's lease expired (or it was cancelled) before the result came.")


async def _settle(action: Any) -> None:
    """Ack or nack; when the channel has closed meanwhile the broker requeues the message anyway."""
    try:
        await action
    except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError, RuntimeError) as exc:
        log.warning("could not settle a delivery (%r); the broker returns it to its queue", exc)


async def _requeue(held: list[AbstractIncomingMessage]) -> None:
    for message in held:
        await _settle(message.nack(requeue=True))


def as_webp(generation: str) -> tuple[bytes, int, int]:
    """A submitted image (base64 WebP, PNG, JPEG...) as WebP bytes, with its size."""
    if generation in ("", "R2"):
        raise BadRequest("Send the image as base64 in 'generation' (this horde offers no R2 upload).",
                         rc="InvalidGeneration")
    try:
        data = base64.b64decode(generation, validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise BadRequest("'generation' is not a base64-encoded image.", rc="InvalidGeneration") from exc
    if image.format == "WEBP":
        return data, image.width, image.height
    out = io.BytesIO()
    image.convert("RGB").save(out, format="WEBP", quality=WEBP_QUALITY)
    return out.getvalue(), image.width, image.height


def seed_text(seed: str | None) -> str:
    """The seed a job is generated with: the requested one, or a random one chosen here."""
    return seed if seed is not None else str(secrets.randbelow(2**32))


def lease_ttl(deadline: datetime | None) -> int:
    if deadline is None:
        return 0
    return max(1, int((as_utc(deadline) - utcnow()).total_seconds()))
