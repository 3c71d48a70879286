"""A worker driven by hand over AMQP (pika, straight to the broker): the real protocol (ask the
dispatcher, claim, publish events) or, in the hostile tests, misbehaviour."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from broker.messages import Capabilities, ClaimReply, ClaimRequest, JobAsk, JobOffer, Message, ModelOffer
from broker.topology import EVENTS_EXCHANGE, ask_key, claim_key

REPLY_TO = "amq.rabbitmq.reply-to"


class ManualWorker:
    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.user = pika.URLParameters(url).credentials.username
        self.channel = self.open_channel()
        self.replies: list[ClaimReply] = []
        self.offers: list[JobOffer] = []
        self.channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True)

    def open_channel(self) -> BlockingChannel:
        channel = self.connection.channel()
        channel.confirm_delivery()
        return channel

    def _on_reply(self, _ch, _method, props, body: bytes) -> None:  # type: ignore[no-untyped-def]
        if props.type == JobOffer.schema_name:
            self.offers.append(JobOffer.model_validate_json(body))
        else:
            self.replies.append(ClaimReply.model_validate_json(body))

    def publish(self, key: str, message: Message, *, exchange: str = EVENTS_EXCHANGE, user_id: str | None = None,
                channel: BlockingChannel | None = None, **props: Any) -> None:
        (channel or self.channel).basic_publish(
            exchange, key, message.encode(),
            pika.BasicProperties(message_id=props.pop("message_id", uuid.uuid4().hex), type=message.schema_name,
                                 user_id=user_id or self.user, delivery_mode=props.pop("delivery_mode", 2), **props),
            mandatory=True)

    def _wait(self, received: list[Any], seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        while not received and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)
        return received.pop(0) if received else None

    def claim(self, job_id: str, model: str, *, as_worker: str | None = None, decline: bool = False,
              lease_id: str | None = None) -> ClaimReply | None:
        request = ClaimRequest(job_id=job_id, worker=as_worker or self.name, model=model, decline=decline,
                               lease_id=lease_id)
        self.publish(claim_key(self.name), request, reply_to=REPLY_TO, correlation_id=job_id)
        return self._wait(self.replies, 10)

    def ask(self, models: list[str], *, kind: str = "image", as_worker: str | None = None,
            seconds: float = 10, amount: int = 1) -> JobOffer | None:
        """Ask the dispatcher for a job (or up to ``amount``); its answer (an offer, or "not now"),
        None if none came."""
        self.send_ask(models, kind=kind, as_worker=as_worker, amount=amount)
        return self.next_offer(seconds)

    def send_ask(self, models: list[str], *, kind: str = "image", as_worker: str | None = None, amount: int = 1,
                 **limits: Any) -> None:
        """Leave an ask with the dispatcher, as a worker waiting for work does; ``next_offer`` reads
        the answer. ``limits``: the owner's (``max_pixels``...), as in ``Capabilities``."""
        capabilities = Capabilities(models=[ModelOffer(name=m, kind=kind) for m in models],  # type: ignore[arg-type]
                                    can_censor=True, **limits)
        ask = JobAsk(worker=as_worker or self.name, capabilities=capabilities, amount=amount)
        self.publish(ask_key(self.name), ask, reply_to=REPLY_TO, correlation_id=uuid.uuid4().hex, delivery_mode=1)

    def next_offer(self, seconds: float = 10) -> JobOffer | None:
        return self._wait(self.offers, seconds)

    def take(self, model: str, job_id: str, *, seconds: float = 20) -> JobOffer:
        """Ask until the dispatcher offers ``job_id`` (other jobs offered meanwhile are given back)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            offer = self.ask([model], seconds=max(0.1, deadline - time.monotonic()))
            if offer is not None and offer.granted and offer.job is not None:
                if offer.job.job_id == job_id:
                    return offer
                self.claim(offer.job.job_id, model, decline=True, lease_id=offer.lease_id)
        raise AssertionError(f"job {job_id} was not offered to {self.name} within {seconds}s")

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
