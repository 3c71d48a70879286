"""Claiming a job from the trusted claims service: RPC over AMQP with direct reply-to.

The worker publishes a ``ClaimRequest`` to ``horde.events`` with routing key ``claim.<worker>``
and ``reply_to=amq.rabbitmq.reply-to``; the service answers straight to this channel, so the
worker needs no queue of its own (it may not declare one). RabbitMQ only routes such replies to
the channel that published the request and requires that channel to already consume the
pseudo-queue in no-ack mode: ``start`` must run before the first ``claim``, on the same channel
as the publisher.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import ClaimReply, ClaimRequest, decode
from broker.topology import EVENTS_EXCHANGE, claim_key
from consumers.errors import ClaimFailed

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class ClaimClient:
    """Sends claims and matches their replies by ``correlation_id``."""

    def __init__(self, channel: AbstractChannel, publisher: Publisher, *, worker: str, timeout: float) -> None:
        self._channel = channel
        self._publisher = publisher
        self._worker = worker
        self._timeout = timeout
        self._pending: dict[str, asyncio.Future[ClaimReply]] = {}

    async def start(self) -> None:
        # Declared passively so the robust channel re-consumes it first after a reconnect
        # (queues are restored in the order they were declared, before the job consumers).
        queue = await self._channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def claim(self, job_id: str, model: str, *, decline: bool = False) -> ClaimReply:
        """Ask for the lease on ``job_id`` (or, with ``decline``, ask the horde to put it back in the
        queue of ``model``); raise ClaimFailed if no reply comes in time."""
        correlation_id = uuid.uuid4().hex
        reply = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = reply
        request = ClaimRequest(job_id=job_id, worker=self._worker, model=model, decline=decline)
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
