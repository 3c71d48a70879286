"""The volunteer worker: ask the dispatcher for jobs, generate, publish.

A worker reads no shared queue (issue 6: ``read`` would let it purge one). When it is ready for
its next job it *asks* (``ask.<worker>``, direct reply-to) with what it can do, and the trusted
dispatcher answers with a job already leased to it (``consumers/claims.py``). Its own queue
(jobs of the users its owner serves first, issue 5) is the one queue it consumes; those
deliveries it claims itself, and they go before the offered jobs.

One channel carries everything: prefetch 1, manual acks, the asks and claims (direct reply-to
only answers the channel that published) and the confirmed result events. The worker declares
nothing (its ``configure`` permission is empty).

Per offered job::

    does it fit after all? ── no ──► give it back unstarted (queued again, no attempt spent)
    decode source images (while the previous job generates)
    ── its turn (own-queue jobs first) ── the device is free ── generate (thread)
    encode ► publish completed/faulted, confirmed (while the next job generates)
    stopping before its turn ──────► give it back

Per delivery from its own queue::

    decode ──── malformed, or the wrong kind for the queue ─────► reject (dead-lettered)
    can this worker do it? ── no (size, img2img, censor…) ──────► decline (after a pause), then ack
    decode source images (while the previous job generates)
    ── next in line: wait until the job generating is about to end ──
    claim ─── no reply / not sent ──────────────────────────────► hold it, claim again (after a pause)
          ─── denied ── requeue? ───────────────────────────────► decline, then ack  |  else ack
          ─── granted ► ack (the lease holds the job now)
    ── the device is free ── generate (thread)
    encode ► publish completed/faulted, confirmed (while the next job generates)
    stopping before the claim ──────────────────────────────────► leave it unacked: it returns to
                                                                   the queue when the connection closes

It acks every delivery it settles and never nacks (issue 6): a job it will not do is *declined*
(a claim request with ``decline``; the claims service puts it back in the queue and answers),
so the broker watchdog can count any delivery that a worker channel settled without an ack as
a dropped job. Only a malformed message, which only a horde bug can put in a job queue, is
rejected (dead-lettered for the admins).

No idle device between jobs (docs/worker.md): the worker asks for its next job when the one
generating has about a quarter of its expected time left (it measures its speed), so the offer
arrives, is decoded and starts the moment the device is free. Results are encoded and published
while the next job runs. At most one offered job waits for the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from broker.amqp import Publisher, amqp_user, connect
from broker.errors import BadMessage, BrokerError
from broker.messages import ClaimReply, JobCompleted, JobFaulted, JobMessage, JobOffer, Message, WorkerHeartbeat, decode
from broker.topology import (
    EVENTS_EXCHANGE,
    WORKER_NAME_RE,
    completed_key,
    faulted_key,
    heartbeat_key,
    job_queue,
    worker_queue,
)
from consumers.cache import Generated, ModelCache
from consumers.claims import ClaimClient
from consumers.errors import ClaimFailed, OfferWithdrawn, WorkerStartError
from consumers.pipelines import GeneratedImage, PreparedImage, encode_webp
from consumers.turns import Turns

log = logging.getLogger(__name__)

#: The longest a shutdown step (cancelling a consumer, closing the connection) may take.
SHUTDOWN_STEP_SECONDS = 5.0

#: Pause before handing a job back after a failure that may repeat at once (claims service
#: down, a denial asking for requeue): with prefetch 1 it would come straight back to us.
RETRY_DELAY_SECONDS = 1.0
_SPEED_WEIGHT = 0.2  # weight of the newest job in the moving averages of speed
#: The next job claims when the one generating has this share of its expected time left.
CLAIM_AHEAD_SHARE = 0.25


class Outcome(enum.Enum):
    ACK = "ack"  # claimed (the lease holds it now), or dropped (someone else's job)
    REJECT = "reject"  # malformed: dead-lettered, never retried
    DECLINE = "decline"  # not for us: the claims service puts it back in the queue, then we ack
    RETURN = "return"  # shutting down: left unacked, the broker requeues it when we disconnect


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line about a job with ``job=<id>``, so one grep follows a job."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"job={self.extra['job_id'] if self.extra else '?'} {msg}", kwargs


@dataclass
class JobTimes:
    """When each step of a job happened (``time.perf_counter()`` seconds), for the overhead figures."""

    job_id: str
    received: float
    decoded: float = 0.0
    turn: float = 0.0
    claimed: float = 0.0
    acked: float = 0.0
    generated_from: float = 0.0
    generated_to: float = 0.0
    encoded: float = 0.0
    published: float = 0.0

    def overhead(self) -> dict[str, float]:
        """Milliseconds the worker itself spent around generation, step by step."""
        return {
            "decode": (self.decoded - self.received) * 1000,
            "claim": (self.claimed - self.turn) * 1000,
            "ack": (self.acked - self.claimed) * 1000,
            "to_generate": (self.generated_from - self.acked) * 1000,
            "encode": (self.encoded - self.generated_to) * 1000,
            "publish": (self.published - self.encoded) * 1000,
        }


@dataclass
class Stats:
    """What the heartbeats report: jobs done, and speeds as moving averages."""

    started: float = field(default_factory=time.monotonic)
    jobs_done: int = 0
    jobs_faulted: int = 0
    megapixelsteps_per_second: float = 0.0
    tokens_per_second: float = 0.0
    busy: int = 0
    warmed_up: set[str] = field(default_factory=set)

    def record(self, result: Generated) -> None:
        kind = "image" if isinstance(result, GeneratedImage) else "text"
        if kind not in self.warmed_up:
            # The first generation of a kind warms the device up (kernels, caches) and runs several
            # times slower: measured, it would make the worker ask for its next jobs too late.
            self.warmed_up.add(kind)
            return
        if isinstance(result, GeneratedImage):
            speed = result.megapixelsteps / max(result.seconds, 1e-6)
            self.megapixelsteps_per_second = _average(self.megapixelsteps_per_second, speed)
        else:
            speed = result.tokens / max(result.seconds, 1e-6)
            self.tokens_per_second = _average(self.tokens_per_second, speed)


def _average(current: float, new: float) -> float:
    return new if current == 0 else (1 - _SPEED_WEIGHT) * current + _SPEED_WEIGHT * new


class Worker:
    """Serves the models of ``cache`` from the horde's queues as ``name``.

    ``amqp_url`` carries the worker's own credentials: its user is the ``user_id`` the broker
    validates on every event. Heartbeats go out every ``heartbeat_seconds``. ``claim_ahead=False``
    makes the next job claim only once the device is free (for measurements).
    """

    def __init__(self, *, amqp_url: str, name: str, cache: ModelCache, claim_timeout: float,
                 heartbeat_seconds: float = 5.0, ask_refresh_seconds: float = 10.0, claim_ahead: bool = True) -> None:
        if not WORKER_NAME_RE.match(name):
            raise ValueError(f"invalid worker name {name!r}: use 2-63 of a-z, 0-9 and '-'")
        self.name = name
        self._url = amqp_url
        self._claim_timeout = claim_timeout
        self._cache = cache
        self._heartbeat_seconds = heartbeat_seconds
        self._ask_refresh = ask_refresh_seconds
        # Held by the next job to run, from its claim until it has the device; jobs from the
        # worker's own queue (its owner's chosen users) get it first.
        self._turns = Turns()
        self._device = asyncio.Lock()  # one generation at a time
        self._device_free = asyncio.Event()
        self._device_free.set()
        self._expected_start = 0.0  # when the generation in progress started (perf_counter)
        self._expected_end: float | None = None  # when it should end, from the measured speed
        self._claim_seconds = 0.0  # moving average of a claim's round trip
        self._claim_ahead = claim_ahead  # False: the next job claims only once the device is free
        self._stop_requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._claims: ClaimClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[None] | None = None
        self.stats = Stats()
        #: Timings of the most recent jobs (bench/worker_overhead.py reads them).
        self.timings: deque[JobTimes] = deque(maxlen=10_000)

    @property
    def models(self) -> list[str]:
        return self._cache.models

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
        self._heartbeat = asyncio.create_task(self._beat())
        self._asking = asyncio.create_task(self._ask_for_jobs())
        log.info("worker %s ready: asking for jobs of %s on %s", self.name, ", ".join(self.models),
                 self._cache.device)

    async def _start_on(self, connection: AbstractRobustConnection) -> None:
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        log.info("worker %s loading %s", self.name, ", ".join(self.models))
        await _check_queues(connection, self.models)
        await asyncio.to_thread(self._cache.start)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=1)
        self._publisher = Publisher(channel, user_id=amqp_user(self._url))
        self._claims = ClaimClient(channel, self._publisher, worker=self.name, timeout=self._claim_timeout,
                                   ask_refresh=self._ask_refresh)
        await self._claims.start()  # the reply-to consumer must exist before the first claim
        own = await _own_queue(connection, channel, self.name)
        if own is not None:
            self._consumers.append((own, await own.consume(self._on_delivery)))

    async def stop(self) -> None:
        """Stop taking jobs, finish the one in hand, give the others back, and disconnect."""
        if self._stop_requested.is_set():
            return
        self._stop_requested.set()
        log.info("worker %s stopping: finishing the job in hand", self.name)
        for queue, tag in self._consumers:
            try:
                # Bounded: on a connection that is reconnecting (or whose user was deleted, so it
                # never will) the cancel would wait for a channel forever and SIGTERM would hang.
                await asyncio.wait_for(queue.cancel(tag), SHUTDOWN_STEP_SECONDS)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
                log.debug("cancel %s: %r", queue.name, exc)
        if self._asking is not None:
            self._asking.cancel()
            await asyncio.gather(self._asking, return_exceptions=True)
        await asyncio.sleep(0)  # let deliveries that arrived before cancel-ok spawn their tasks
        if self._claims is not None:
            for offer in self._claims.take_offers():  # offered after the last ask: not started, given back
                await self._give_back(offer, JobLog(log, {"job_id": offer.job.job_id if offer.job else "?"}),
                                      "stopping")
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), SHUTDOWN_STEP_SECONDS)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
                log.warning("worker %s: the connection did not close cleanly (%r)", self.name, exc)
        log.info("worker %s stopped", self.name)

    def _on_connection_lost(self, _connection: object, exc: BaseException | None) -> None:
        if self._stop_requested.is_set():
            return
        if "ACCESS_REFUSED" in str(exc):  # issue 6: a paused or in-maintenance worker may read no queue
            log.warning("worker %s: RabbitMQ refused its consume: it is paused, in maintenance or deleted "
                        "(%s); reconnecting every few seconds until it is back in service", self.name, exc)
        else:
            log.warning("worker %s lost its connection (%s); reconnecting, held jobs go back to their queues",
                        self.name, exc)

    def _on_reconnected(self, _connection: object) -> None:
        log.info("worker %s reconnected: consuming again", self.name)

    # --- one delivery ------------------------------------------------------------------------------

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        # Our own task, not the client's: a channel closing under us must not cancel a job
        # half-way between generating and publishing its result, and stop() can wait for it.
        task = asyncio.create_task(self._handle(message, time.perf_counter()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage, received: float) -> None:
        """A copy from the worker's own queue: a job of a user its owner serves first."""
        try:
            job = decode(JobMessage, message.body, message.type)
        except BadMessage as exc:
            log.warning("message=%s queue=%s malformed, dead-lettering it: %s", message.message_id,
                        worker_queue(self.name), exc)
            await self._settle(message, Outcome.REJECT, log)
            return
        jlog = JobLog(log, {"job_id": job.job_id})
        model = self._model_for(job)
        if model is None:  # its copies in the models' queues are still there for others
            jlog.info("own-queue job for none of this worker's models; dropping this copy")
            await self._settle(message, Outcome.ACK, jlog)
            return
        jlog.info("received model=%s kind=%s attempt=%d tier=%d redelivered=%s (owner's priority)", model, job.kind,
                  job.attempt, job.tier, message.redelivered)
        times = JobTimes(job.job_id, received)
        outcome = await self._take_turn(model, job, message, times, jlog)
        if outcome is Outcome.DECLINE:
            outcome = await self._decline(model, job, jlog)
        if outcome is not None:
            await self._settle(message, outcome, jlog)

    def _model_for(self, job: JobMessage) -> str | None:
        """Which of this worker's models serves a job from its own queue (any of the requested ones)."""
        fitting = [m for m in self.models if self._cache.sources[m].kind == job.kind]
        return next((m for m in fitting if not job.models or m in job.models), None)

    async def _take_turn(self, model: str, job: JobMessage, message: AbstractIncomingMessage, times: JobTimes,
                         jlog: JobLog) -> Outcome | None:
        """Claim and generate in turn, before offered jobs; None once the delivery is acked (the
        lease holds the job)."""
        reason = self._cache.refusal(model, job)
        if reason is not None:
            jlog.info("not for this worker (%s): declining it, the horde puts it back in the queue", reason)
            # The pause: with prefetch 1 the job may come straight back to us.
            await self._pause(RETRY_DELAY_SECONDS)
            return Outcome.RETURN if self._stop_requested.is_set() else Outcome.DECLINE
        prepared: PreparedImage | Exception | None
        try:
            prepared = await asyncio.to_thread(self._cache.prepare, job)
        except Exception as exc:  # a bad source image: claim it and report the fault to the requester
            prepared = exc
        times.decoded = time.perf_counter()
        async with self._turns.turn(first=True):
            await self._until_claim_time()
            times.turn = time.perf_counter()
            if self._stop_requested.is_set():
                jlog.info("not started before shutdown; returning it to the queue")
                return Outcome.RETURN
            try:
                reply = await self._claim(model, job, jlog)
            except Exception:  # a bug must not wedge the queue: the job goes back, the worker lives
                jlog.exception("unexpected error while claiming; declining the job")
                return Outcome.DECLINE
            if isinstance(reply, Outcome):
                return reply
            times.claimed = time.perf_counter()
            self._claim_seconds = _average(self._claim_seconds, times.claimed - times.turn)
            if not self._device_free.is_set():
                jlog.info("claimed ahead: the device is finishing the previous job")
            await self._settle(message, Outcome.ACK, jlog)
            times.acked = time.perf_counter()
            await self._device.acquire()  # still the next job: nobody else claims until it runs
        await self._run(model, job, reply, prepared, times, jlog)
        return None

    async def _run(self, model: str, job: JobMessage, reply: ClaimReply, prepared: PreparedImage | Exception | None,
                   times: JobTimes, jlog: JobLog) -> None:
        """Generate a leased job on the device (already acquired) and publish the outcome."""
        try:
            result = await self._generate(model, job, reply, prepared, times, jlog)
        finally:
            self._device.release()
        event, key = await self._event(model, job, reply, result, times, jlog)
        await self._report(event, key, jlog)
        times.published = time.perf_counter()
        self.timings.append(times)
        self._log_times(times, jlog)

    # --- offered jobs ------------------------------------------------------------------------------

    async def _ask_for_jobs(self) -> None:
        """Ask for a job whenever the device is about to be free, and run what is offered."""
        assert self._claims is not None
        while not self._stop_requested.is_set():
            await self._until_claim_time()
            try:
                offer = await self._claims.next_offer(self._cache.capabilities(), self._stop_requested)
            except OfferWithdrawn as exc:  # the dispatcher said "not now" (paused, lease cap)
                log.info("worker %s: no job now (%s); asking again in %gs", self.name, exc.reason, exc.retry_after)
                await self._pause(exc.retry_after)
                continue
            if offer is None:
                return
            started = asyncio.Event()
            task = asyncio.create_task(self._run_offer(offer, started, time.perf_counter()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _t, s=started: s.set())
            await started.wait()  # ask again only once this one has the device

    async def _run_offer(self, offer: JobOffer, started: asyncio.Event, received: float) -> None:
        assert offer.job is not None and offer.lease_id is not None
        job, model = offer.job, offer.model
        jlog = JobLog(log, {"job_id": job.job_id})
        jlog.info("offered model=%s kind=%s attempt=%d tier=%d lease=%s", model, job.kind, job.attempt, job.tier,
                  offer.lease_id)
        reason = self._cache.refusal(model, job)
        if reason is not None:  # the dispatcher applies the same rule: only a changed policy gets here
            await self._give_back(offer, jlog, reason)
            return
        times = JobTimes(job.job_id, received)
        prepared: PreparedImage | Exception | None
        try:
            prepared = await asyncio.to_thread(self._cache.prepare, job)
        except Exception as exc:  # a bad source image: report the fault to the requester
            prepared = exc
        times.decoded = time.perf_counter()
        if not self._device_free.is_set():
            jlog.info("offered ahead: the device is finishing the previous job")
        async with self._turns.turn():
            await self._until_claim_time()
            while self._turns.first_waiting():
                jlog.info("giving way to a job of the owner's chosen users")
                await self._turns.give_way()
                await self._until_claim_time()
            times.turn = times.claimed = times.acked = time.perf_counter()
            await self._until_device_free()
            if self._stop_requested.is_set():
                await self._give_back(offer, jlog, "stopping before it started")
                return
            await self._device.acquire()
        started.set()
        reply = ClaimReply(job_id=job.job_id, granted=True, lease_id=offer.lease_id,
                           lease_deadline=offer.lease_deadline)
        await self._run(model, job, reply, prepared, times, jlog)

    async def _give_back(self, offer: JobOffer, jlog: JobLog, why: str) -> None:
        """Hand an offered job back unstarted: the horde queues it again without spending an attempt."""
        assert offer.job is not None and self._claims is not None
        jlog.info("giving the job back unstarted (%s)", why)
        try:
            reply = await self._claims.claim(offer.job.job_id, offer.model, decline=True, lease_id=offer.lease_id)
        except ClaimFailed as exc:
            jlog.warning("could not give it back (%s); it returns when its lease expires", exc)
            return
        jlog.info("given back (%s)", reply.reason or "no reason")

    async def _ask(self, model: str, job: JobMessage, jlog: JobLog, *, decline: bool) -> ClaimReply | None:
        """The claims service's answer to a claim (or a decline), asked again after a pause for as
        long as it does not answer, the delivery held meanwhile; None if we stop first."""
        assert self._claims is not None
        what = "decline" if decline else "claim"
        while True:
            try:
                return await self._claims.claim(job.job_id, model, decline=decline)
            except ClaimFailed as exc:
                jlog.warning("%s failed (%s); holding the job and asking again", what, exc)
            await self._pause(RETRY_DELAY_SECONDS)
            if self._stop_requested.is_set():
                jlog.info("not started before shutdown; returning it to the queue")
                return None

    async def _decline(self, model: str, job: JobMessage, jlog: JobLog) -> Outcome:
        """Have the horde put the job back in the queue, then ack it (RETURN if we stop first)."""
        reply = await self._ask(model, job, jlog, decline=True)
        if reply is None:
            return Outcome.RETURN
        jlog.info("declined (%s)", reply.reason or "no reason")
        return Outcome.ACK

    async def _claim(self, model: str, job: JobMessage, jlog: JobLog) -> ClaimReply | Outcome:
        reply = await self._ask(model, job, jlog, decline=False)
        if reply is None:
            return Outcome.RETURN
        if not reply.granted:
            jlog.info("claim denied (%s); %s", reply.reason or "no reason",
                      "declining it, for another worker" if reply.requeue else "dropping it")
            return Outcome.DECLINE if reply.requeue else Outcome.ACK
        if reply.lease_id is None:
            jlog.error("claim granted without a lease id; declining the job")
            return Outcome.DECLINE
        jlog.info("claim granted lease=%s deadline=%s", reply.lease_id, reply.lease_deadline)
        return reply

    async def _generate(self, model: str, job: JobMessage, reply: ClaimReply,
                        prepared: PreparedImage | Exception | None, times: JobTimes,
                        jlog: JobLog) -> Generated | Exception:
        if isinstance(prepared, Exception):
            return prepared
        self.stats.busy += 1
        times.generated_from = time.perf_counter()
        expected = self._expected_seconds(job)
        self._expected_start = times.generated_from
        self._expected_end = None if expected is None else times.generated_from + expected
        self._device_free.clear()
        try:
            return await asyncio.to_thread(self._cache.generate, model, job, seed=reply.seed, prepared=prepared)
        except Exception as exc:  # whatever the model raised, the claims service must learn it
            jlog.exception("generation failed")
            return exc
        finally:
            times.generated_to = time.perf_counter()
            self._expected_end = None
            self._device_free.set()
            self.stats.busy -= 1

    async def _until_claim_time(self) -> None:
        """Wait until the generation in progress is about to end, so that the next job's claim
        round trip overlaps it and the device does not wait for it; no longer, so that the next
        job's lease does not tick while it waits. Without a speed estimate yet (the first job of
        each kind), wait for the generation to end."""
        if self._device_free.is_set():
            return
        if self._expected_end is None or not self._claim_ahead:
            await self._device_free.wait()
            return
        # A margin for the claim's round trip and for the estimate's error (a quarter of the job).
        expected = self._expected_end - self._expected_start
        claim_ahead = max(0.05, 3 * self._claim_seconds, CLAIM_AHEAD_SHARE * expected)
        wait = self._expected_end - claim_ahead - time.perf_counter()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._device_free.wait(), wait)

    async def _until_device_free(self) -> None:
        """Wait for the device to be free, or for a stop request (then an offered job goes back)."""
        waits = [asyncio.ensure_future(self._device_free.wait()), asyncio.ensure_future(self._stop_requested.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()

    def _expected_seconds(self, job: JobMessage) -> float | None:
        """How long ``job`` should generate, from this worker's measured speed (None: not known yet)."""
        if job.kind == "text":
            speed = self.stats.tokens_per_second
            return job.text_params.max_length / speed if speed else None
        speed, p = self.stats.megapixelsteps_per_second, job.image_params
        return p.width * p.height * p.steps / 1e6 / speed if speed else None

    async def _event(self, model: str, job: JobMessage, reply: ClaimReply, result: Generated | Exception,
                     times: JobTimes, jlog: JobLog) -> tuple[Message, str]:
        """The completion (result encoded off the event loop) or the fault to publish."""
        assert reply.lease_id is not None
        if not isinstance(result, Exception):
            try:
                event = await asyncio.to_thread(_completed, self.name, model, job, reply.lease_id, result)
            except Exception as exc:
                jlog.exception("encoding the result failed")
                result = exc
            else:
                times.encoded = time.perf_counter()
                self.stats.jobs_done += 1
                self.stats.record(result)
                return event, completed_key(self.name)
        times.encoded = time.perf_counter()
        self.stats.jobs_faulted += 1
        fault = JobFaulted(job_id=job.job_id, lease_id=reply.lease_id, worker=self.name,
                           reason=f"{type(result).__name__}: {result}"[:2000])
        return fault, faulted_key(self.name)

    async def _report(self, event: Message, key: str, jlog: JobLog) -> None:
        """Publish ``event`` and wait for the broker's confirm."""
        assert self._publisher is not None
        try:
            await self._publisher.publish(EVENTS_EXCHANGE, key, event, message_id=uuid.uuid4().hex)
        except BrokerError as exc:
            # The job is acked but still leased to us in the database: when the lease expires the
            # reconciler requeues it, so it is late, never lost.
            jlog.error("could not publish %s (%s); the job goes back to the queue when its lease expires",
                       event.schema_name, exc)
            return
        jlog.info("published %s", event.schema_name)

    def _log_times(self, times: JobTimes, jlog: JobLog) -> None:
        overhead = times.overhead()
        jlog.info("timings ms: %s, generate %.1f",
                  ", ".join(f"{k} {v:.1f}" for k, v in overhead.items()),
                  (times.generated_to - times.generated_from) * 1000)

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome,
                      logger: logging.Logger | JobLog) -> None:
        if outcome is Outcome.RETURN:
            logger.info("left unacknowledged: the broker returns it to the queue when this worker disconnects")
            return
        try:
            if outcome is Outcome.ACK:
                await message.ack()
            else:
                assert outcome is Outcome.REJECT, outcome
                await message.reject(requeue=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # The delivery belonged to a channel that has closed: the broker requeued it.
            logger.warning("could not %s the delivery (%r); the broker returns it to the queue", outcome.value, exc)
            return
        logger.info("settled: %s", outcome.value)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past a stop request (shutdown hands jobs back at once)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)

    # --- heartbeats --------------------------------------------------------------------------------

    def heartbeat(self) -> WorkerHeartbeat:
        stats, policy = self.stats, self._cache.policy
        return WorkerHeartbeat(
            worker=self.name, models=self.models, loaded_models=self._cache.loaded,
            state="busy" if stats.busy else "idle", jobs_done=stats.jobs_done, jobs_faulted=stats.jobs_faulted,
            megapixelsteps_per_second=round(stats.megapixelsteps_per_second, 4),
            tokens_per_second=round(stats.tokens_per_second, 2), device=str(self._cache.device),
            nsfw=policy.nsfw, max_pixels=policy.max_pixels,
            uptime_seconds=round(time.monotonic() - stats.started, 1), sent_at=datetime.now(UTC),
        )

    async def _beat(self) -> None:
        """Publish a heartbeat now and every ``heartbeat_seconds`` (not persistent: the next one
        replaces a lost one)."""
        warned = False
        while not self._stop_requested.is_set():
            assert self._publisher is not None
            try:
                await self._publisher.publish(EVENTS_EXCHANGE, heartbeat_key(self.name), self.heartbeat(),
                                              message_id=uuid.uuid4().hex, persistent=False)
                warned = False
            except BrokerError as exc:
                if not warned:
                    log.warning("heartbeat not sent (%s); retrying every %gs", exc, self._heartbeat_seconds)
                warned = True
            await self._pause(self._heartbeat_seconds)


def _completed(worker: str, model: str, job: JobMessage, lease_id: str, result: Generated) -> JobCompleted:
    state = "censored" if result.censored else "ok"
    if isinstance(result, GeneratedImage):
        return JobCompleted(
            job_id=job.job_id, lease_id=lease_id, worker=worker, model=model, seed=result.seed, state=state,
            image=encode_webp(result.image, result.metadata), width=result.image.width,
            height=result.image.height, generation_seconds=result.seconds,
        )
    return JobCompleted(
        job_id=job.job_id, lease_id=lease_id, worker=worker, model=model, seed=result.seed, state=state,
        text=result.text, media_type="text/plain", tokens=result.tokens, generation_seconds=result.seconds,
    )


async def _own_queue(connection: AbstractRobustConnection, channel: AbstractChannel,
                     worker: str) -> AbstractQueue | None:
    """The worker's own queue (jobs of its owner's chosen users), if the horde declared one.

    Probed on a channel of its own: a missing queue closes the channel that asked."""
    name = worker_queue(worker)
    probe = await connection.channel()
    try:
        await probe.declare_queue(name, passive=True)
    except (aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.ChannelAccessRefused):
        log.info("no own queue %s (a worker registered without one): serving the models' queues only", name)
        return None
    finally:
        if not probe.is_closed:
            await probe.close()
    return await channel.declare_queue(name, passive=True)


async def _check_queues(connection: AbstractRobustConnection, models: list[str]) -> None:
    """Fail early if the horde has no queue for one of our models (the API declares them): the
    dispatcher would never offer it a job. A passive declare needs no permission; a missing queue
    closes the channel that asked, so each asks on a channel of its own."""
    for model in models:
        probe = await connection.channel()
        try:
            await probe.declare_queue(job_queue(model), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise WorkerStartError(
                f"queue {job_queue(model)!r} does not exist: start the horde API first (it declares the queues) "
                f"or check the model name"
            ) from exc
        finally:
            if not probe.is_closed:
                await probe.close()
