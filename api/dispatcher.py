"""The dispatcher: the only reader of the models' queues, handing each job to a worker that asked.

No volunteer worker reads a shared queue (issue 6): ``read`` on a queue would also let it purge
the queue, and RabbitMQ cannot tell who purged. Instead a worker asks ``ask.<worker>`` (direct
reply-to) when it is ready for its next job, and the dispatcher answers with a job already leased
to it (``JobOffer``). The priority queues stay in front: the dispatcher takes a job out of a
model's queue only while a worker waits for that model, so what waits, waits in priority order
in RabbitMQ: while someone waits for a model the dispatcher consumes its queue, and RabbitMQ pushes
the heads, best first, at most ``hold`` unacked (so it looks past up to that many heads that fit
no waiting worker); each job handed out makes room for the next head, with no round trip asked
for it. ``api.matching`` gives the best job held to the worker that has waited longest among those
it fits; a round's leases are one transaction. An ask for several (``JobAsk.amount``) is given up
to that many of what is held in one round, within the lease cap, in one offer (``JobOffer.also``).
When nobody has waited for a model for ``linger`` seconds, what is held goes back to its queue
(``nack``, requeued in place).

At the door: a job being accepted by this process that a waiting worker fits, for a model whose
queue is drained, is inserted already leased (one statement) and offered at once, without passing
through its queue (``at_the_door``, ``lease_at_door``, ``hand_over``, called by ``api.intake``).
Same rule as a round (``api.matching.at_the_door``); it saves the publish, its confirm, the
delivery and a second commit, which were most of a quiet horde's dispatch latency.

One dispatcher leads at a time, whichever API process first consumes ``horde.asks``
exclusively; the others stand by and try again every few seconds, so a dead leader is replaced
(its held deliveries go back to their queues when its connection closes, and workers repeat
their asks every ``HORDE_ASK_REFRESH_SECONDS``). It runs on a connection of its own, not robust:
on any loss it starts over and stands for election again.

Per job::

    delivered ── malformed, or the wrong kind for its queue ──► reject (dead-lettered)
             ── held while an ask may fit ── leased with the round (conditional UPDATE, lease cap) ──
                 granted ► offer to the worker, ack      | stale copy (done, claimed...) ► ack, dropped
                 worker unavailable / at its lease cap ► answer "not now", keep the job held
             ── nobody has waited for its model for ``linger`` s ──► nack, back in its queue
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from pamqp import commands
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.accounts import WorkerDirectory
from api.claims import ClaimsService
from api.matching import Ask, Held, at_the_door, plan
from api.moderation import record_offence
from broker.errors import BadMessage
from broker.messages import ClaimReply, JobAsk, JobMessage, JobOffer, Message, OfferedJob, decode
from broker.topology import ASKS_QUEUE, job_queue

log = logging.getLogger(__name__)

#: An ask refreshed this recently comes from a live worker; an older one is probed first (a
#: reply to a direct reply-to whose channel is gone is dropped silently, and the job would wait
#: for its lease to expire).
PROBE_AFTER_SECONDS = 1.0
#: Wait before retrying a grant the database could not decide.
DATABASE_RETRY_SECONDS = 1.0
#: A model's queue found with ready jobs is not asked again for this long (the door is for a quiet
#: horde; a congested one takes the queue).
BUSY_SECONDS = 1.0

class _ReplyToProbe(commands.Queue.Declare):
    """A passive declare of a direct reply-to name (``amq.rabbitmq.reply-to.<base64>``): RabbitMQ
    accepts it, but pamqp refuses such names (``/``, ``+``, ``=``) before sending."""

    def validate(self) -> None:
        if self.queue is not None and len(self.queue) > 256:
            raise ValueError("Max length exceeded for queue")


_AMQP_ERRORS = (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError, OSError)


class Dispatcher:
    def __init__(self, *, amqp_url: str, engine: AsyncEngine, claims: ClaimsService, workers: WorkerDirectory,
                 model_kinds: Mapping[str, str], hold: int, ask_ttl_seconds: float,
                 max_leases: int, retry_after_seconds: float, stand_every_seconds: float = 2.0,
                 linger_seconds: float = 10.0) -> None:
        self._url = amqp_url
        self._engine = engine
        self._claims = claims
        self._workers = workers
        self._kinds = dict(model_kinds)
        self._hold = hold
        self._linger = linger_seconds
        self._wanted_at: dict[str, float] = {}  # model -> when (monotonic) a worker last waited for it
        self._recheck_at = 0.0  # loop time of the pending wake-up for lingering models, if later than now
        self._queues: dict[str, AbstractQueue] = {}
        self._consuming: dict[str, str] = {}  # model -> consumer tag, while a worker waits for it
        # Models whose queue had no ready message while consumed and holding fewer than ``hold``: it
        # stays so (RabbitMQ pushes each new message at once) until the consumer stops or ``hold`` fill.
        self._empty: set[str] = set()
        self._busy_until: dict[str, float] = {}  # model -> until when (monotonic) not to ask again
        self._ask_ttl = ask_ttl_seconds
        self._max_leases = max_leases
        self._retry_after = retry_after_seconds
        self._stand_every = stand_every_seconds
        self._asks: dict[str, Ask] = {}
        self._held: dict[str, list[Held]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._channel: AbstractChannel | None = None  # answers go out on it
        self._probe: AbstractChannel | None = None
        self._connection: AbstractRobustConnection | None = None
        self.leading = False

    # --- election ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Stand for election every few seconds; lead while elected."""
        while True:
            try:
                await self._lead()
            except asyncio.CancelledError:
                raise
            except _AMQP_ERRORS as exc:
                if self.leading:
                    log.warning("dispatcher lost its connection (%r); standing again", exc)
            except Exception:
                log.exception("dispatcher failed; stepping down and standing again")
            finally:
                await self._step_down()
            await asyncio.sleep(self._stand_every)

    async def _lead(self) -> None:
        connection = await aio_pika.connect(self._url, client_properties={"connection_name": "horde-dispatcher"})
        self._connection = connection  # type: ignore[assignment]
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        connection.close_callbacks.add(lambda *_: lost.done() or lost.set_result(None))
        # No publisher confirms on the channel that answers: an offer's confirm says only that the
        # broker took it (a lost offer's lease expires), and awaiting it cost a round trip per offer.
        channel = await connection.channel(publisher_confirms=False)
        asks = await channel.declare_queue(ASKS_QUEUE, passive=True)
        try:
            await asks.consume(self._on_ask, exclusive=True)
        except aiormq.exceptions.ChannelAccessRefused:
            return  # another process leads
        self.leading = True
        self._channel = channel
        jobs_channel = await connection.channel()
        # A model's queue is consumed only while someone waits for it; what it delivers is held here
        # to pick from, ``hold`` at most (the waiting may not fit the first heads).
        await jobs_channel.set_qos(prefetch_count=self._hold)
        for model in self._kinds:
            self._queues[model] = await jobs_channel.declare_queue(job_queue(model), passive=True)
        log.info("dispatcher: this process leads (%d model queues)", len(self._kinds))
        matcher = asyncio.create_task(self._match_forever())
        try:
            # A matcher that fails (a bug) must not leave a leader that takes asks and answers none:
            # its error is raised here, and the process steps down and stands again.
            await asyncio.wait([lost, matcher], return_when=asyncio.FIRST_COMPLETED)
            if matcher.done():
                matcher.result()
        finally:
            matcher.cancel()
            await asyncio.gather(matcher, return_exceptions=True)

    async def _step_down(self) -> None:
        self._asks.clear()
        self._held.clear()  # their deliveries go back to their queues with the connection
        self._queues.clear()
        self._consuming.clear()
        self._wanted_at.clear()
        self._empty.clear()
        self._busy_until.clear()
        self._channel = self._probe = None
        self.leading = False
        if self._connection is not None:
            with contextlib.suppress(*_AMQP_ERRORS, RuntimeError):
                await self._connection.close()
            self._connection = None

    # --- what comes in -------------------------------------------------------------------------

    async def _on_ask(self, message: AbstractIncomingMessage) -> None:
        try:
            ask = decode(JobAsk, message.body, message.type)
        except BadMessage as exc:
            log.warning("malformed ask from %s: %s", message.user_id, exc)
            await message.reject(requeue=False)
            return
        await message.ack()  # the ask lives here now; the worker repeats it if we die
        routing_key = message.routing_key or ""
        worker = await self._workers.sender(ask.worker, user_id=message.user_id, routing_key=routing_key)
        if worker is None:
            log.warning("ask refused: worker %r not registered or not authenticated as %r", ask.worker, message.user_id)
            await record_offence(self._engine, "forged_ask",
                                 {"worker": ask.worker, "routing_key": routing_key}, amqp_user=message.user_id)
            return
        if not message.reply_to:
            return
        now = time.monotonic()
        known = self._asks.get(ask.worker)
        since = known.since if known is not None and known.correlation_id == message.correlation_id else now
        trusted = known.trusted if known is not None else await self._claims.trusted(worker)
        self._asks[ask.worker] = Ask(worker=ask.worker, capabilities=ask.capabilities, since=since, refreshed=now,
                                     reply_to=message.reply_to, correlation_id=message.correlation_id or "",
                                     record=worker, trusted=trusted,
                                     amount=min(ask.amount, self._max_leases))  # more would be refused
        self._wake.set()

    async def _on_job(self, model: str, message: AbstractIncomingMessage) -> None:
        """Hold a job delivered from ``model``'s queue; a malformed one is dead-lettered."""
        try:
            job = decode(JobMessage, message.body, message.type)
        except BadMessage as exc:
            log.warning("message=%s queue=%s malformed, dead-lettering it: %s", message.message_id,
                        job_queue(model), exc)
            await message.reject(requeue=False)
            return
        if job.kind != self._kinds[model]:
            log.warning("job %s: a %s job in the queue of %s model %s; dead-lettering it", job.job_id, job.kind,
                        self._kinds[model], model)
            await message.reject(requeue=False)
            return
        held = self._held.setdefault(model, [])
        held.append(Held(model, job, next(self._seq), message))
        if len(held) >= self._hold:
            self._empty.discard(model)  # RabbitMQ may keep the next ones ready now
        self._wake.set()

    # --- taking jobs out of the queues only for those who wait ------------------------------------

    def _wanting(self) -> dict[str, list[Ask]]:
        """The models someone waits for, with the asks waiting for each."""
        wanting: dict[str, list[Ask]] = {}
        for ask in self._asks.values():
            for offer in ask.capabilities.models:
                if offer.name in self._queues:
                    wanting.setdefault(offer.name, []).append(ask)
        return wanting

    async def _fetch(self, wanting: Mapping[str, list[Ask]]) -> None:
        """Consume the queue of every model someone waits for: RabbitMQ pushes its heads, best first,
        up to ``hold`` unacked at a time, and each job handed out makes room for the next head."""
        now = time.monotonic()
        for model in wanting:
            self._wanted_at[model] = now
            if model not in self._consuming:
                self._consuming[model] = await self._queues[model].consume(functools.partial(self._on_job, model))

    async def _release(self, wanting: Mapping[str, list[Ask]]) -> None:
        """Stop consuming, and put back the jobs held, for models nobody has waited for in ``linger``
        seconds: back in their queue they keep their place and their priority. The lingering spares
        a busy model a cancel, a re-consume and a redelivery of what it held between two asks."""
        now = time.monotonic()
        for model in [m for m in self._consuming if m not in wanting]:
            idle = now - self._wanted_at.get(model, now)
            if idle < self._linger:
                self._recheck(self._linger - idle)
                continue
            await self._queues[model].cancel(self._consuming.pop(model))
            self._empty.discard(model)
        for model, held in self._held.items():
            if model not in self._consuming:
                for job in held:
                    await _settle(job.delivery.nack(requeue=True))
                held.clear()

    def _recheck(self, delay: float) -> None:
        """Wake the matcher after ``delay`` (one timer at a time: a busy model lingers every round)."""
        loop = asyncio.get_running_loop()
        if self._recheck_at <= loop.time():  # none pending (uvloop's timer handles cannot say when)
            self._recheck_at = loop.time() + delay
            loop.call_later(delay, self._wake.set)

    # --- the door: jobs handed over as they are accepted ----------------------------------------

    async def at_the_door(self, arriving: Sequence[JobMessage]) -> list[tuple[Ask, Held]]:
        """Pairs (waiting worker, arriving job) to lease with the jobs' INSERT; their asks are taken
        out, so that no round gives those workers another job meanwhile. None unless this process
        leads. Only for models whose queue has nothing more to push (``_drained``, ``_ask_if_empty``)."""
        if not self.leading or not self._asks:
            return []
        candidates = [Held(model, job, next(self._seq)) for job in arriving for model in job.models
                      if self._kinds.get(model) == job.kind]
        pairs: list[tuple[Ask, Held]] = []
        try:
            while True:  # planned again after each answer from RabbitMQ, so the asks taken are current
                taken = {held.job.job_id for _, held in pairs}
                found = at_the_door(list(self._asks.values()), [h for held in self._held.values() for h in held],
                                    [c for c in candidates if c.job.job_id not in taken], self._drained)
                if unasked := {held.model for _, held in found} - self._empty:
                    for model in unasked:
                        await self._ask_if_empty(model)
                    continue
                for ask, _ in found:
                    self._asks.pop(ask.worker, None)  # an ask for several jobs may take several
                alive = await self._alive_each([ask for ask, _ in found])
                for ask, held in found:
                    if alive[ask.worker]:
                        pairs.append((ask, held))
                    else:
                        log.info("worker %s is gone; job %s is offered to another", ask.worker, held.job.job_id)
                if all(alive.values()):
                    return pairs
        except _AMQP_ERRORS:  # the connection is going: this process is stepping down
            return []

    def _drained(self, model: str) -> bool:
        """Whether everything in the model's queue may have reached this dispatcher: it is consumed,
        fewer than ``hold`` are held, and it was not found with ready jobs a moment ago (whether it
        has none is then asked of RabbitMQ: ``_ask_if_empty``)."""
        return (model in self._consuming and len(self._held.get(model, ())) < self._hold
                and time.monotonic() >= self._busy_until.get(model, 0.0))

    async def _ask_if_empty(self, model: str) -> None:
        """Ask RabbitMQ whether the model's queue has a ready message (a job taken from it a moment
        ago is replaced by the next head only when RabbitMQ has pushed it): none, and it is known
        empty (``_empty``) while it stays so; some, and it is not asked again for ``BUSY_SECONDS``
        (a congested queue is not asked every flush)."""
        if (queue := self._queues.get(model)) is None:
            raise ConnectionError("this process stepped down")
        if (await queue.declare()).message_count == 0:
            self._empty.add(model)
        else:
            self._busy_until[model] = time.monotonic() + BUSY_SECONDS

    async def lease_at_door(self, conn: AsyncConnection, row: dict[str, Any], ask: Ask,
                            held: Held) -> ClaimReply | None:
        """Insert the arriving job's ``row`` already leased to the worker, if it may lease now."""
        return await self._claims.insert_leased(conn, row, held.job, held.model, ask.record,
                                                max_leases=self._max_leases)

    async def hand_over(self, pairs: Sequence[tuple[Ask, Held]], granted: Mapping[str, ClaimReply]) -> set[str]:
        """Offer each worker its job leased at the door (committed by now); the others get their ask
        back. Returns the ids of the jobs handed over: the intake publishes the rest."""
        handed: set[str] = set()
        for ask, picks in _by_ask(pairs).items():
            leased = [(held, reply) for held in picks
                      if (reply := granted.get(held.job.job_id)) is not None and reply.granted]
            if not leased:
                self._keep(None, ask)
                continue
            handed.update(held.job.job_id for held, _ in leased)
            for held, _ in leased:
                log.info("job %s: handed to %s at the door", held.job.job_id, ask.worker)
            try:
                if self._channel is None:
                    raise ConnectionError("this process stepped down")
                await self._answer(ask, _offer(leased))
            except _AMQP_ERRORS as exc:
                log.warning("jobs %s: offer to %s not sent (%r); their leases expire and they are queued again",
                            ", ".join(held.job.job_id for held, _ in leased), ask.worker, exc)
        return handed

    # --- matching ------------------------------------------------------------------------------

    async def _match_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._forget_silent_asks()
            await self._fetch(self._wanting())
            pairs = plan(list(self._asks.values()), [h for held in self._held.values() for h in held])
            for ask, held in pairs:
                self._asks.pop(ask.worker, None)  # an ask for several jobs may take several
                self._held[held.model].remove(held)
            if pairs:
                await self._hand_out(pairs)
            await self._release(self._wanting())
            if pairs and self._asks:
                self._wake.set()  # the others may fit what the next heads hold

    def _forget_silent_asks(self) -> None:
        now = time.monotonic()
        for name in [n for n, a in self._asks.items() if now - a.refreshed > self._ask_ttl]:
            del self._asks[name]

    async def _hand_out(self, pairs: list[tuple[Ask, Held]]) -> None:
        """Lease a round's pairs in one transaction, then answer the workers and ack the jobs."""
        alive = await self._alive_each([ask for ask, _ in pairs])
        for ask, held in pairs:
            if not alive[ask.worker]:
                log.info("worker %s is gone; job %s stays for another", ask.worker, held.job.job_id)
                self._keep(held)
        pairs = [(ask, held) for ask, held in pairs if alive[ask.worker]]
        try:
            granted = await self._claims.lease([(held.job, held.model, ask.record) for ask, held in pairs],
                                               max_leases=self._max_leases) if pairs else {}
        except (SQLAlchemyError, OSError) as exc:
            log.error("%d jobs not dispatched, database error: %s", len(pairs), exc)
            for ask, held in pairs:
                self._keep(held, ask, delay=DATABASE_RETRY_SECONDS)
            return
        await asyncio.gather(*(self._settle_ask(ask, [(held, granted.get(held.job.job_id)) for held in picks])
                               for ask, picks in _by_ask(pairs).items()))

    async def _settle_ask(self, ask: Ask, picks: list[tuple[Held, ClaimReply | None]]) -> None:
        """Answer one worker of the round: one offer with every job leased to it, or why none (for
        a job not leased, ``grant`` says why, and leases it after all if what stood in the way has
        just gone)."""
        leased: list[tuple[Held, ClaimReply]] = []
        not_now: ClaimReply | None = None
        delay = 0.0
        for held, reply in picks:
            job = held.job
            if reply is None:
                try:
                    reply = await self._claims.grant(job.job_id, held.model, ask.record, max_leases=self._max_leases)
                except (SQLAlchemyError, OSError) as exc:
                    log.error("job %s: not dispatched, database error: %s", job.job_id, exc)
                    delay = DATABASE_RETRY_SECONDS
                    self._keep(held, delay=delay)
                    continue
            if reply.granted:
                leased.append((held, reply))
            elif reply.requeue:  # the worker may not have a job now (paused, at its lease cap)
                not_now = reply
                self._keep(held)
            else:
                log.debug("job %s: copy dropped (%s)", job.job_id, reply.reason)
                await _settle(held.delivery.ack())
        if leased:
            await self._answer(ask, _offer(leased))
            for held, _ in leased:
                await _settle(held.delivery.ack())
        elif not_now is not None:  # it asks again later
            await self._answer(ask, JobOffer(granted=False, reason=not_now.reason, retry_after=self._retry_after))
        else:
            self._keep(None, ask, delay=delay)

    def _keep(self, held: Held | None, ask: Ask | None = None, *, delay: float = 0.0) -> None:
        """Put a job (and an ask) back to be matched again, now or after ``delay``."""
        if held is not None:
            self._held.setdefault(held.model, []).append(held)
        if ask is not None and ask.worker not in self._asks:
            self._asks[ask.worker] = ask
        if delay:
            asyncio.get_running_loop().call_later(delay, self._wake.set)
        else:
            self._wake.set()

    async def _alive_each(self, asks: Sequence[Ask]) -> dict[str, bool]:
        """``_alive`` of each worker asking (one probe at a time: a 404 closes the probe channel)."""
        alive: dict[str, bool] = {}
        for ask in asks:
            if ask.worker not in alive:
                alive[ask.worker] = await self._alive(ask)
        return alive

    async def _alive(self, ask: Ask) -> bool:
        """Whether the worker's reply-to still has its consumer, asked only of an ask older than
        ``PROBE_AFTER_SECONDS``: RabbitMQ answers a passive declare of it while the asking channel
        lives, and closes the probing channel (404) once it is gone."""
        if time.monotonic() - ask.refreshed <= PROBE_AFTER_SECONDS:
            return True
        try:
            if self._probe is None or self._probe.is_closed:
                if self._connection is None:  # stepped down meanwhile (the door calls in from the intake)
                    raise ConnectionError("this process stepped down")
                self._probe = await self._connection.channel()
            await (await self._probe.get_underlay_channel()).rpc(_ReplyToProbe(queue=ask.reply_to, passive=True))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    async def _answer(self, ask: Ask, offer: Message) -> None:
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            aio_pika.Message(offer.encode(), correlation_id=ask.correlation_id, type=offer.schema_name,
                             content_type="application/json"),
            routing_key=ask.reply_to,
            # RabbitMQ 3.10 returns every mandatory publish to a direct reply-to, delivered or not
            # (measured: one basic.return per offer), so mandatory only cost a return to parse. A
            # worker that is gone is found by the probe instead (_alive), and its lease expires.
            mandatory=False,
        )


def _by_ask(pairs: Sequence[tuple[Ask, Held]]) -> dict[Ask, list[Held]]:
    """A round's pairs by worker asking (an ask for several jobs may have several)."""
    by_ask: dict[Ask, list[Held]] = {}
    for ask, held in pairs:
        by_ask.setdefault(ask, []).append(held)
    return by_ask


def _offer(leased: Sequence[tuple[Held, ClaimReply]]) -> JobOffer:
    """One offer of every job leased to one ask: the first in the offer's own fields, the rest in
    ``also``."""
    (first, reply), *rest = leased
    also = [OfferedJob(job=held.job, model=held.model, lease_id=r.lease_id, lease_deadline=r.lease_deadline)
            for held, r in rest]
    return JobOffer(granted=True, job=first.job, model=first.model, lease_id=reply.lease_id,
                    lease_deadline=reply.lease_deadline, also=also)


async def _settle(settling: object) -> None:
    with contextlib.suppress(*_AMQP_ERRORS, RuntimeError):
        await settling  # type: ignore[misc]
