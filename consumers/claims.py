"""Asking the dispatcher for jobs, and claiming from the claims service: RPC over AMQP with
direct reply-to.

The worker publishes a ``JobAsk`` (``ask.<worker>``) when it is ready for a job; the dispatcher
answers, whenever it has one that fits, with a ``JobOffer`` holding the job and its lease (or, for
an ask with an ``amount``, up to that many jobs, each with its lease). While
no offer comes the worker repeats the same ask (same correlation id) every ``ask_refresh``
seconds. Every granted offer is kept, even one that arrives late, since the job is leased to us.

For jobs from its own queue, and to give a job back, the worker publishes a ``ClaimRequest`` to
``horde.events`` with routing key ``claim.<worker>`` and ``reply_to=amq.rabbitmq.reply-to``;
the service answers straight to this channel, so the
worker needs no queue of its own (it may not declare one). RabbitMQ only routes such replies to
the channel that published the request and requires that channel to already consume the
pseudo-queue in no-ack mode: ``start`` must run before the first ``claim``, on the same channel
as the publisher.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import Capabilities, ClaimReply, ClaimRequest, JobAsk, JobOffer, decode
from broker.topology import EVENTS_EXCHANGE, ask_key, claim_key
from consumers.errors import ClaimFailed, OfferWithdrawn

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class ClaimClient:
    """Sends claims and matches their replies by ``correlation_id``."""

    def __init__(self, channel: AbstractChannel, publisher: Publisher, *, worker: str, timeout: float,
                 ask_refresh: float = 10.0) -> None:
        self._channel = channel
        self._publisher = publisher
        self._worker = worker
        self._timeout = timeout
        self._ask_refresh = ask_refresh
        self._pending: dict[str, asyncio.Future[ClaimReply]] = {}
        self._offers: deque[JobOffer] = deque()  # granted, not yet taken
        self._not_now: JobOffer | None = None  # the dispatcher's last "not now"
        self._answered = asyncio.Event()

    async def start(self) -> None:
        # Declared passively so the robust channel re-consumes it first after a reconnect
        # (queues are restored in the order they were declared, before the job consumers).
        queue = await self._channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def next_offer(self, capabilities: Capabilities, stop: asyncio.Event, amount: int = 1) -> JobOffer | None:
        """The next job leased to us, asking the dispatcher for one (or up to ``amount``, the rest
        kept for the next calls) if none is in hand; None if ``stop`` is set first. Raises
        OfferWithdrawn when the dispatcher says "not now"."""
        correlation_id = uuid.uuid4().hex
        ask = JobAsk(worker=self._worker, capabilities=capabilities, amount=amount)
        while not self._offers:
            if self._not_now is not None:
                not_now, self._not_now = self._not_now, None
                raise OfferWithdrawn(not_now.reason, not_now.retry_after)
            if stop.is_set():
                return None
            self._answered.clear()
            try:
                await self._publisher.publish(
                    EVENTS_EXCHANGE, ask_key(self._worker), ask, message_id=uuid.uuid4().hex, persistent=False,
                    reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id,
                )
            except BrokerError as exc:
                log.warning("ask not sent (%s); asking again in %gs", exc, self._ask_refresh)
            waits = [asyncio.ensure_future(self._answered.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=self._ask_refresh, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        return self._offers.popleft()

    def take_offers(self) -> list[JobOffer]:
        """The offers received and not taken (to give back when stopping)."""
        offers = list(self._offers)
        self._offers.clear()
        return offers

    async def claim(self, job_id: str, model: str, *, decline: bool = False,
                    lease_id: str | None = None) -> ClaimReply:
        """Ask for the lease on ``job_id`` (or, with ``decline``, ask the horde to put it back in the
        queue of ``model``, or with ``lease_id`` too, to take back an offered job we did not
        start); raise ClaimFailed if no reply comes in time."""
        correlation_id = uuid.uuid4().hex
        reply = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = reply
        request = ClaimRequest(job_id=job_id, worker=self._worker, model=model, decline=decline, lease_id=lease_id)
        try:
            await self._publisher.publish(
                EVENTS_EXCHANGE, claim_key(self._worker), request, message_id=uuid.uuid4().hex,
                persistent=False, reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id,
            )
            answer = await asyncio.wait_for(reply, self._timeout)
        except TimeoutError as exc:
            raise ClaimFailed(f"no claim reply within {self._timeout:g}s") from exc
        except BrokerError as exc:
            raise ClaimFailed(f"claim request not sent: {exc}") from exc
        finally:
            self._pending.pop(correlation_id, None)
        if answer.job_id != job_id:
            raise ClaimFailed(f"claim reply names job {answer.job_id}, not {job_id}")
        return answer

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.type == JobOffer.schema_name:
            self._on_offer(message)
            return
        waiter = self._pending.get(message.correlation_id or "")
        try:
            reply = decode(ClaimReply, message.body, message.type)
        except BadMessage as exc:
            log.warning("ignoring malformed claim reply %s: %s", message.correlation_id, exc)
            return
        if waiter is None or waiter.done():
            # The claim timed out and its job went back to the queue; if this was a grant, the
            # lease simply expires and the reconciler requeues the job again.
            log.warning("job=%s late claim reply ignored (granted=%s)", reply.job_id, reply.granted)
            return
        waiter.set_result(reply)

    def _on_offer(self, message: AbstractIncomingMessage) -> None:
        try:
            offer = decode(JobOffer, message.body, message.type)
        except BadMessage as exc:
            log.warning("ignoring malformed offer %s: %s", message.correlation_id, exc)
            return
        if offer.granted and (offer.job is None or offer.lease_id is None):
            log.warning("ignoring an offer without a job or a lease")
            return
        if offer.granted:
            self._offers.extend(offer.leased())
        else:
            self._not_now = offer
        self._answered.set()
