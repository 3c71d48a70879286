"""The volunteer worker: consume per-model job queues, claim, generate, publish, then ack.

One channel carries everything: prefetch 1 per consumer, manual acks, the claim RPC (direct
reply-to only answers the channel that published) and the confirmed result events. The worker
declares nothing (its ``configure`` permission is empty): it looks its queues up passively.

Per delivery::

    decode ── malformed ──────────────────────────────► reject (dead-lettered)
    claim ─── no reply / not sent ────────────────────► nack, requeue (after a pause)
          ─── denied ── requeue? ─────────────────────► nack, requeue  |  else ack (not ours)
          ─── granted ► generate (thread) ► publish completed/faulted, confirmed ► ack

An event that cannot be published is never acked for: the job is returned to the queue.
Generation runs in a thread so the event loop keeps AMQP heartbeats flowing, and one job
generates at a time although the worker may hold one delivery per model queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from broker.amqp import Publisher, amqp_user, connect
from broker.errors import BadMessage, BrokerError
from broker.messages import ClaimReply, JobCompleted, JobFaulted, JobMessage, Message, decode
from broker.topology import EVENTS_EXCHANGE, WORKER_NAME_RE, completed_key, faulted_key, job_queue
from consumers.claims import ClaimClient
from consumers.errors import ClaimFailed, WorkerStartError
from consumers.pipelines import DeviceChoice, PipelineCache

log = logging.getLogger(__name__)

#: Pause before handing a job back after a failure that may repeat at once (claims service
#: down, a denial asking for requeue): with prefetch 1 it would come straight back to us.
RETRY_DELAY_SECONDS = 1.0


class Outcome(enum.Enum):
    ACK = "ack"  # finished (result confirmed by the broker) or dropped (someone else's job)
    REJECT = "reject"  # malformed: dead-lettered, never retried
    REQUEUE = "requeue"  # back to the queue now (shutting down before starting it)
    REQUEUE_LATER = "requeue later"  # back to the queue after RETRY_DELAY_SECONDS


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line about a job with ``job=<id>``, so one grep follows a job."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"job={self.extra['job_id'] if self.extra else '?'} {msg}", kwargs


class Worker:
    """Serves ``models`` (model name → diffusers folder) from the horde's queues as ``name``.

    ``amqp_url`` carries the worker's own credentials: its user is the ``user_id`` the broker
    validates on every event. ``pipelines`` is an already-built cache for exactly ``models``
    (tests share one); by default one is built for ``device``.
    """

    def __init__(self, *, amqp_url: str, name: str, models: dict[str, Path], claim_timeout: float,
                 device: DeviceChoice = "auto", pipelines: PipelineCache | None = None) -> None:
        if not WORKER_NAME_RE.match(name):
            raise ValueError(f"invalid worker name {name!r}: use 2-63 of a-z, 0-9 and '-'")
        if pipelines is not None and set(pipelines.models) != set(models):
            raise ValueError(f"pipelines serve {pipelines.models}, not {list(models)}")
        self.name = name
        self._url = amqp_url
        self._claim_timeout = claim_timeout
        self._pipelines = pipelines or PipelineCache(models, device=device)
        self._turn = asyncio.Lock()  # one job between claim and ack at a time
        self._stop_requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._claims: ClaimClient | None = None

    @property
    def models(self) -> list[str]:
        return self._pipelines.models

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Connect, load the models, then start consuming (logs "ready" once consuming)."""
        self._connection = await connect(self._url, name=f"horde-worker-{self.name}")
        try:
            await self._start_on(self._connection)
        except BaseException:
            await self._connection.close()
            raise
        log.info("worker %s ready: consuming %s on %s", self.name,
                 ", ".join(job_queue(m) for m in self.models), self._pipelines.device)

    async def _start_on(self, connection: AbstractRobustConnection) -> None:
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        log.info("worker %s loading %s", self.name, ", ".join(self.models))
        await asyncio.to_thread(self._pipelines.load_all)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=1)
        self._publisher = Publisher(channel, user_id=amqp_user(self._url))
        self._claims = ClaimClient(channel, self._publisher, worker=self.name, timeout=self._claim_timeout)
        await self._claims.start()  # the reply-to consumer must exist before the first claim
        for model in self.models:
            queue = await _job_queue(channel, model)
            tag = await queue.consume(functools.partial(self._on_delivery, model))
            self._consumers.append((queue, tag))

    async def stop(self) -> None:
        """Stop taking jobs, finish the one in hand, give the others back, and disconnect."""
        if self._stop_requested.is_set():
            return
        self._stop_requested.set()
        log.info("worker %s stopping: finishing the job in hand", self.name)
        for queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                log.debug("cancel %s: %s", queue.name, exc)
        await asyncio.sleep(0)  # let deliveries that arrived before cancel-ok spawn their tasks
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
        log.info("worker %s stopped", self.name)

    def _on_connection_lost(self, _connection: object, exc: BaseException | None) -> None:
        if not self._stop_requested.is_set():
            log.warning("worker %s lost its connection (%s); reconnecting, held jobs go back to their queues",
                        self.name, exc)

    def _on_reconnected(self, _connection: object) -> None:
        log.info("worker %s reconnected: consuming again", self.name)

    async def _on_delivery(self, model: str, message: AbstractIncomingMessage) -> None:
        # Our own task, not the client's: a channel closing under us must not cancel a job
        # half-way between publishing its result and acking it, and stop() can wait for it.
        task = asyncio.create_task(self._handle(model, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, model: str, message: AbstractIncomingMessage) -> None:
        try:
            job = decode(JobMessage, message.body, message.type)
        except BadMessage as exc:
            log.warning("message=%s queue=%s malformed, dead-lettering it: %s",
                        message.message_id, job_queue(model), exc)
            await self._settle(message, Outcome.REJECT, log)
            return
        jlog = JobLog(log, {"job_id": job.job_id})
        jlog.info("received model=%s attempt=%d tier=%d redelivered=%s",
                  model, job.attempt, job.tier, message.redelivered)
        await self._settle(message, await self._take_turn(model, job, jlog), jlog)

    async def _take_turn(self, model: str, job: JobMessage, jlog: JobLog) -> Outcome:
        if job.kind != "image":
            jlog.warning("a %s job in an image model's queue; dead-lettering it", job.kind)
            return Outcome.REJECT
        async with self._turn:
            if self._stop_requested.is_set():
                jlog.info("not started before shutdown; returning it to the queue")
                return Outcome.REQUEUE
            try:
                return await self._process(model, job, jlog)
            except Exception:  # a bug must not wedge the queue: the job goes back, the worker lives
                jlog.exception("unexpected error; returning the job to the queue")
                return Outcome.REQUEUE_LATER

    async def _process(self, model: str, job: JobMessage, jlog: JobLog) -> Outcome:
        assert self._claims is not None
        try:
            reply = await self._claims.claim(job.job_id, model)
        except ClaimFailed as exc:
            jlog.warning("claim failed, returning the job to the queue: %s", exc)
            return Outcome.REQUEUE_LATER
        if not reply.granted:
            jlog.info("claim denied (%s); %s", reply.reason or "no reason",
                      "returning it to the queue" if reply.requeue else "dropping it")
            return Outcome.REQUEUE_LATER if reply.requeue else Outcome.ACK
        if reply.lease_id is None:
            jlog.error("claim granted without a lease id; returning the job to the queue")
            return Outcome.REQUEUE_LATER
        jlog.info("claim granted lease=%s deadline=%s", reply.lease_id, reply.lease_deadline)
        return await self._generate_and_report(model, job, reply, jlog)

    async def _generate_and_report(self, model: str, job: JobMessage, reply: ClaimReply,
                                   jlog: JobLog) -> Outcome:
        assert reply.lease_id is not None
        seed = reply.seed if reply.seed is not None else job.params.seed
        event: Message
        try:
            result = await asyncio.to_thread(self._pipelines.generate, model, job, seed=seed)
        except Exception as exc:  # whatever the model raised, the claims service must learn it
            jlog.exception("generation failed")
            event = JobFaulted(job_id=job.job_id, lease_id=reply.lease_id, worker=self.name,
                               reason=f"{type(exc).__name__}: {exc}"[:2000])
            key = faulted_key(self.name)
        else:
            event = JobCompleted(
                job_id=job.job_id, lease_id=reply.lease_id, worker=self.name, model=model,
                seed=result.seed, state=result.state, image=result.image, width=result.width,
                height=result.height, generation_seconds=result.seconds,
            )
            key = completed_key(self.name)
        return await self._report(event, key, jlog)

    async def _report(self, event: Message, key: str, jlog: JobLog) -> Outcome:
        """Publish ``event`` and wait for the broker's confirm; only then may the job be acked."""
        assert self._publisher is not None
        try:
            await self._publisher.publish(EVENTS_EXCHANGE, key, event, message_id=uuid.uuid4().hex)
        except BrokerError as exc:
            # Never ack a job whose result the broker did not take. If the channel is gone the
            # broker has requeued it already (the nack then fails harmlessly); if it lives, the
            # nack hands it back instead of leaving it stuck unacked.
            jlog.error("could not publish %s (%s); returning the job to the queue", event.schema_name, exc)
            return Outcome.REQUEUE
        jlog.info("published %s", event.schema_name)
        return Outcome.ACK

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome,
                      logger: logging.Logger | JobLog) -> None:
        try:
            if outcome is Outcome.ACK:
                await message.ack()
            elif outcome is Outcome.REJECT:
                await message.reject(requeue=False)
            else:
                if outcome is Outcome.REQUEUE_LATER:
                    await self._pause(RETRY_DELAY_SECONDS)
                await message.nack(requeue=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # The delivery belonged to a channel that has closed: the broker requeued it.
            logger.warning("could not %s the delivery (%r); the broker returns it to the queue", outcome.value, exc)
            return
        logger.info("settled: %s", outcome.value)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past a stop request (shutdown hands jobs back at once)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)


async def _job_queue(channel: AbstractChannel, model: str) -> AbstractQueue:
    """The model's queue, looked up passively (workers may not declare; the API does)."""
    name = job_queue(model)
    try:
        return await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise WorkerStartError(
            f"queue {name!r} does not exist: start the horde API first (it declares the queues) "
            f"or check the model name"
        ) from exc
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise WorkerStartError(f"not allowed to read queue {name!r}: is this worker registered for {model!r}?") from exc
