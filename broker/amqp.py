"""Connecting, declaring and publishing with confirms (aio-pika for async code, pika for sync).

Every publish here is persistent and mandatory on a confirm channel: when ``publish`` returns, the
broker has taken responsibility for the message (it is routed to a queue and fsynced or held).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from pika.adapters.blocking_connection import BlockingChannel

from broker.errors import BrokerUnavailable, PublishRefused
from broker.messages import Message
from broker.topology import DEAD_LETTER_EXCHANGE, Topology

log = logging.getLogger(__name__)

HOW_TO_START = (
    "start it with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`), "
    "or point HORDE_RABBITMQ_URL at a running broker"
)


def amqp_user(url: str) -> str:
    """The login user of an AMQP URL: the value the broker validates ``user_id`` against."""
    return unquote(urlsplit(url).username or "guest")


def redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.username or ''}@{host}{port}{parts.path}"


def _reason(exc: BaseException) -> str:
    """A short cause for humans; the clients' own exception texts nest several layers deep."""
    text = repr(exc)
    for marker, reason in (("ACCESS_REFUSED", "login refused: check the user and password"),
                           ("NOT_ALLOWED", "access to the vhost refused"), ("refused", "connection refused"),
                           ("timed out", "timed out"), ("Timeout", "timed out")):
        if marker in text:
            return reason
    return str(exc) or exc.__class__.__name__


async def connect(url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself); a clear error if the broker is down."""
    try:
        return await aio_pika.connect_robust(url, client_properties={"connection_name": name}, timeout=10)
    except (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"Cannot reach RabbitMQ at {redact(url)} ({_reason(exc)}): {HOW_TO_START}") from exc


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    exchanges = {}
    for name, kind in topology.exchanges:
        exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
    for spec in topology.queues:
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        for exchange, key in spec.bindings:
            await queue.bind(exchanges[exchange], routing_key=key)


def properties(message: Message, *, message_id: str, priority: int = 0, user_id: str | None = None,
               persistent: bool = True, **extra: object) -> dict[str, object]:
    """The AMQP properties every horde message carries."""
    return {
        "message_id": message_id,
        "type": message.schema_name,
        "content_type": "application/json",
        "priority": priority,
        "user_id": user_id,
        "delivery_mode": aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        **extra,
    }


class Publisher:
    """Confirmed, mandatory publishes on one channel; concurrent publishes pipeline on it."""

    def __init__(self, channel: AbstractChannel, *, user_id: str | None) -> None:
        self._channel = channel
        self._user_id = user_id
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, *, user_id: str | None) -> "Publisher":
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, user_id=user_id)

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        if name not in self._exchanges:
            self._exchanges[name] = await self._channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(self, exchange: str, routing_key: str, message: Message, *, message_id: str,
                      priority: int = 0, persistent: bool = True, **extra: object) -> None:
        body = aio_pika.Message(
            message.encode(),
            **properties(message, message_id=message_id, priority=priority, user_id=self._user_id,
                         persistent=persistent, **extra),  # type: ignore[arg-type]
        )
        await self._send(exchange, routing_key, body)

    async def dead_letter(self, message: AbstractIncomingMessage, *, queue: str, reason: str) -> None:
        """Send a refused delivery to the dead-letter exchange ourselves, for a queue that has none
        (``horde.heartbeats``: expired heartbeats must not pile up there). The headers say where it
        died and who sent it, as ``x-death`` and ``user_id`` would."""
        copy = aio_pika.Message(
            message.body, message_id=message.message_id, type=message.type, content_type=message.content_type,
            user_id=self._user_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={DEAD_QUEUE_HEADER: queue, DEAD_REASON_HEADER: reason, DEAD_SENDER_HEADER: message.user_id or ""},
        )
        await self._send(DEAD_LETTER_EXCHANGE, message.routing_key or "", copy)

    async def _send(self, exchange: str, routing_key: str, body: aio_pika.Message) -> None:
        """Publish and wait for the broker's confirm; raise PublishRefused or BrokerUnavailable."""
        try:
            confirmation = await (await self._exchange(exchange)).publish(
                body, routing_key=routing_key, mandatory=True, timeout=30
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishRefused(f"{exchange}/{routing_key}: {exc}") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            raise BrokerUnavailable(f"publish to {exchange}/{routing_key} failed: {exc!r}") from exc
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise PublishRefused(f"{exchange}/{routing_key}: not acknowledged ({confirmation!r})")


#: Headers of a message dead-lettered by the horde itself (``Publisher.dead_letter``).
DEAD_QUEUE_HEADER, DEAD_REASON_HEADER, DEAD_SENDER_HEADER = "x-horde-dead-queue", "x-horde-dead-reason", "x-horde-sender"


def connect_sync(url: str, *, name: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": name}
    params.heartbeat = 30
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"Cannot reach RabbitMQ at {redact(url)} ({_reason(exc)}): {HOW_TO_START}") from exc


def declare_sync(channel: BlockingChannel, topology: Topology) -> None:
    for name, kind in topology.exchanges:
        channel.exchange_declare(name, kind, durable=True)
    for spec in topology.queues:
        channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        for exchange, key in spec.bindings:
            channel.queue_bind(spec.name, exchange, routing_key=key)
