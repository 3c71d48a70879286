"""Each registered worker's own RabbitMQ user, with the least privilege it needs.

Facts relied on were verified on RabbitMQ 3.10.8 (``../shared/reference/rabbitmq-permissions.md``):

- ``{username}`` is not expanded in configure/write/read, and is substituted unescaped in topic
  permissions: so every regex here is literal and generated per worker, from escaped names.
- a topic permission restricts only when an entry exists for that exchange: it is read back after
  it is set, and the user is deleted if it is missing (S5).
- removing permissions does not stop a consumer already attached: pausing also closes the
  user's connections (S7); deleting the user closes them and requeues what they held.

``worker_grant`` is pure (names in, regexes out); ``BrokerAccounts`` does the management API calls.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from urllib.parse import quote, urlsplit, urlunsplit

from aio_pika.abc import AbstractRobustConnection

from broker.amqp import connect, declare
from broker.errors import BrokerError
from broker.management import Management, vhost_of
from broker.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    MAX_PRIORITY,
    WORKER_NAME_RE,
    QueueSpec,
    Topology,
    ask_key,
    claim_key,
    completed_key,
    faulted_key,
    heartbeat_key,
    worker_queue,
    worker_routing_key,
)
from config import Settings

log = logging.getLogger(__name__)

NOTHING = "^$"
#: RabbitMQ user names the horde creates: what is safe in a regex and a routing key (S3).
_SAFE_USER = re.compile(r"^[a-z0-9-]+$")


@dataclass(frozen=True)
class WorkerGrant:
    """Everything a worker's RabbitMQ user may do, as the management API takes it."""

    user: str
    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str
    max_connections: int
    max_channels: int

    def paused(self) -> WorkerGrant:
        """The same user, unable to consume anything: it may still report the job in hand."""
        return replace(self, read=NOTHING)


class ProvisioningError(BrokerError):
    """The broker did not end up with the permissions asked for; the user was removed."""


class UserExists(BrokerError):
    """A RabbitMQ user of that name exists already: never take over someone else's user."""


def amqp_username(prefix: str, worker: str) -> str:
    """The RabbitMQ user of worker ``worker``."""
    user = f"{prefix}{worker}"
    if not WORKER_NAME_RE.match(worker) or not _SAFE_USER.match(user):
        raise ValueError(f"worker name {worker!r} with prefix {prefix!r} is not a safe RabbitMQ user name")
    return user


def literal_regex(names: Iterable[str]) -> str:
    """An anchored regex matching exactly ``names`` (``^$`` for none)."""
    escaped = sorted({re.escape(n) for n in names})
    if len(escaped) == 1:
        return f"^{escaped[0]}$"
    return f"^(?:{'|'.join(escaped)})$" if escaped else NOTHING


def worker_routes(worker: str) -> tuple[str, ...]:
    """The routing keys worker ``worker`` publishes on ``horde.events``, and only those."""
    return ask_key(worker), claim_key(worker), completed_key(worker), faulted_key(worker), heartbeat_key(worker)


def worker_grant(worker: str, *, prefix: str, max_connections: int,
                 max_channels: int) -> WorkerGrant:
    """The permissions of worker ``worker``: declare nothing, publish only its own events, consume
    only its own queue. No worker reads a shared queue (read would also let it purge one, which
    nothing can attribute): the dispatcher hands it its model jobs in answer to its asks."""
    return WorkerGrant(
        user=amqp_username(prefix, worker),
        configure=NOTHING,
        write=literal_regex([EVENTS_EXCHANGE]),
        read=literal_regex([worker_queue(worker)]),
        topic_exchange=EVENTS_EXCHANGE,
        topic_write=literal_regex(worker_routes(worker)),
        topic_read=NOTHING,
        max_connections=max_connections,
        max_channels=max_channels,
    )


def settings_grant(settings: Settings, worker: str) -> WorkerGrant:
    """``worker_grant`` with the prefix and limits of the horde's settings."""
    return worker_grant(worker, prefix=settings.worker_user_prefix,
                        max_connections=settings.worker_max_connections, max_channels=settings.worker_max_channels)


def worker_queue_topology(worker: str) -> Topology:
    """The worker's own queue, with the job queues' arguments, bound to ``horde.jobs``."""
    spec = QueueSpec(worker_queue(worker), {"x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange":
                                            DEAD_LETTER_EXCHANGE}, ((JOBS_EXCHANGE, worker_routing_key(worker)),))
    return Topology(exchanges=((JOBS_EXCHANGE, "direct"),), queues=(spec,))


def new_password() -> str:
    return secrets.token_urlsafe(24)


def password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` form, so the password never leaves this process."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def credentials_url(base_url: str, user: str, password: str) -> str:
    """``base_url`` (its host, port and vhost) with the worker's credentials in it."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class BrokerAccounts:
    """Creates, pauses, resumes and deletes workers' RabbitMQ users in the horde's vhost."""

    def __init__(self, management: Management, vhost: str) -> None:
        self._management = management
        self._vhost = vhost

    async def provision(self, grant: WorkerGrant) -> str:
        """Create the user with a fresh password and its permissions; returns the password.
        On any failure the user is deleted again and the error raised."""
        if await self._management.user_exists(grant.user):
            raise UserExists(f"RabbitMQ user {grant.user} exists already")
        password = new_password()
        await self._management.put_user_hash(grant.user, password_hash(password))
        try:
            await self.apply(grant)
        except Exception:
            await self._management.delete_user(grant.user)
            raise
        log.info("provisioned RabbitMQ user %s (read %s)", grant.user, grant.read)
        return password

    async def apply(self, grant: WorkerGrant) -> None:
        """Set the permissions, topic permission and limits of an existing user; read back the
        topic permission, without which the worker could publish any routing key (S5)."""
        m = self._management
        await m.set_permissions(self._vhost, grant.user, configure=grant.configure, write=grant.write, read=grant.read)
        await m.set_topic_permissions(self._vhost, grant.user, exchange=grant.topic_exchange,
                                      write=grant.topic_write, read=grant.topic_read)
        held = [t for t in await m.topic_permissions(self._vhost, grant.user)
                if t.get("exchange") == grant.topic_exchange]
        if [(t.get("write"), t.get("read")) for t in held] != [(grant.topic_write, grant.topic_read)]:
            raise ProvisioningError(f"topic permission of {grant.user} on {grant.topic_exchange} did not stick: {held}")
        await m.set_user_limit(grant.user, "max-connections", grant.max_connections)
        await m.set_user_limit(grant.user, "max-channels", grant.max_channels)

    async def revoke(self, user: str) -> bool:
        """Delete the user: its connections close and what it held goes back to the queues."""
        deleted = await self._management.delete_user(user)
        log.info("revoked RabbitMQ user %s%s", user, "" if deleted else " (it did not exist)")
        return deleted

    async def pause(self, grant: WorkerGrant, *, reason: str) -> None:
        """No more deliveries: read nothing, and close the connections (an attached consumer
        keeps receiving otherwise, S7); what it held unacked is requeued."""
        await self.apply(grant.paused())
        await self._management.close_connections(grant.user, reason=reason)
        log.info("paused RabbitMQ user %s (%s)", grant.user, reason)

    async def resume(self, grant: WorkerGrant) -> None:
        await self.apply(grant)
        log.info("resumed RabbitMQ user %s", grant.user)


async def declare_worker_queue(connection: AbstractRobustConnection, worker: str) -> None:
    """Declare the worker's own priority queue, on the horde's trusted connection."""
    channel = await connection.channel()
    try:
        await declare(channel, worker_queue_topology(worker))
    finally:
        await channel.close()


async def provision_worker(settings: Settings, worker: str, models: Sequence[str]) -> str:
    """Provision a worker's user and declare its own queue, outside an API process (``horde admin
    create-worker --provision``); returns the password. Nothing is left if a step fails."""
    grant = settings_grant(settings, worker)
    management = Management(settings.rabbitmq_management_url)
    accounts = BrokerAccounts(management, vhost_of(settings.rabbitmq_url))
    try:
        password = await accounts.provision(grant)
        try:
            connection = await connect(settings.rabbitmq_url, name="horde-admin")
            try:
                await declare_worker_queue(connection, worker)
            finally:
                await connection.close()
        except BaseException:
            await accounts.revoke(grant.user)
            raise
        return password
    finally:
        await management.aclose()
