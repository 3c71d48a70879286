"""The broker watchdog: ejects volunteer workers that abuse their read permission.

Read on a queue also lets a worker lock it (an exclusive consume), hoard it (prefetch 0, or
``basic.get`` without acking), drop jobs (``reject``/``nack`` without requeue, or consuming
without acks) or purge it, and no broker permission prevents that
(``../shared/reference/rabbitmq-permissions.md`` S6). That is why no worker reads a shared queue
any more: the models' queues are read by the dispatcher alone (``api/dispatcher.py``), and a
worker may read only its own queue, where the horde puts copies of the jobs of the users its
owner serves first (the originals stay in the models' queues, so nothing it does there can lose
a job). The watchdog still judges how it treats that queue. Every few seconds it reads the
management API's channels and consumers of the horde's vhost and judges each channel of a
registered worker's own AMQP user (never the horde's trusted users, nor users it does not know).

The rules (``judge``, pure) follow from the honest worker's protocol (``consumers/worker.py``,
``docs/worker.md``): prefetch 1 per queue, manual acks, and *every* delivery it settles is acked
(a job it will not do is declined through the claims service, which puts it back in the queue).
So a worker is ejected when one of its channels

- has an exclusive consumer, a consumer with a prefetch other than 1 (0 is unlimited), a consumer
  without acks, or has taken messages with ``basic.get`` without acks;
- settled deliveries without acking them: deliveries (``deliver`` + ``get``) > ``ack`` +
  ``messages_unacknowledged``. The counters are exact but the unacked gauge can be one stats
  interval older, so for a busy channel the difference may be off by what its consumers can hold
  (one each); a larger difference is a drop at once, any difference on a channel whose counters
  stood still for ``settle_seconds`` (three stats intervals: by then the gauge has caught up) is a
  drop too;
- holds a delivery without acking anything for longer than the lease while no lease of its own
  is live (an honest worker holds one look-ahead delivery only while its current job generates,
  under that job's lease);

or when its channels together hold more unacked deliveries than it has queues (its own queue). Ejecting closes its connections (what it held is requeued), deletes its RabbitMQ
user so it cannot log in again, marks the worker suspended and flagged with a strike, and writes
the evidence to the moderation log. Several API processes may run the watchdog: the suspension is
one conditional UPDATE, so only one of them records it; closing and deleting are idempotent.

A purge cannot be attributed (RabbitMQ 3.10 counts purges nowhere per channel and emits no event
for them), which is why workers may not read the shared queues: a purge of one is refused (403).
A worker purging its own queue only loses copies; dropped jobs are dead-lettered and republished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from api.jobs import CLAIMED
from api.provisioning import BrokerAccounts
from api import moderation
from api.tables import jobs, workers
from broker.management import Management, ManagementError, vhost_of
from config import Settings
from config.database import as_utc, utcnow

log = logging.getLogger(__name__)

#: The pseudo-queue of direct reply-to: workers consume it without acks to receive claim replies.
_REPLY_TO = "amq.rabbitmq.reply-to"


# --- the snapshot the rules judge ---------------------------------------------------------------


@dataclass(frozen=True)
class ConsumerView:
    queue: str
    exclusive: bool = False
    prefetch: int = 1
    ack_required: bool = True


@dataclass(frozen=True)
class ChannelView:
    """One channel as the management API shows it (its counters count since it opened)."""

    name: str
    connection: str
    user: str
    # The channel's basic.qos default for new consumers. Evidence only: the listing updates it at
    # the channel's next stats emission, so a fresh channel shows 0 for seconds after its qos 1;
    # the consumer's own prefetch_count, fixed when it subscribed, is what the rules judge.
    prefetch: int = 1
    unacked: int = 0  # messages_unacknowledged: a gauge, up to one stats interval old
    delivered: int = 0  # deliver + get: deliveries that must be acked or rejected
    acked: int = 0
    gets_no_ack: int = 0
    consumers: tuple[ConsumerView, ...] = ()

    @property
    def can_hold(self) -> float:
        """How many deliveries its consumers may hold at once (unlimited with a prefetch of 0):
        how far the lagging unacked gauge may be behind the exact counters."""
        prefetches = [c.prefetch for c in self.consumers if c.ack_required]
        return float("inf") if 0 in prefetches else sum(prefetches)


@dataclass(frozen=True)
class WorkerView:
    id: int
    name: str
    owner_id: int
    amqp_user: str
    queues: int | None = None  # its models + its own queue; None: unknown, counted from its consumers
    lease_until: float | None = None  # the latest deadline (epoch seconds) of its live leases


@dataclass(frozen=True)
class Snapshot:
    at: float  # epoch seconds
    channels: tuple[ChannelView, ...]
    workers: Mapping[str, WorkerView]  # by AMQP user


@dataclass(frozen=True)
class ChannelTrace:
    """What the watchdog remembers of a channel between two snapshots."""

    delivered: int
    acked: int
    counted_since: float  # since when the counters have stood still
    held_since: float | None  # since when it has held deliveries without acking any


@dataclass(frozen=True)
class Verdict:
    worker: WorkerView
    reasons: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)


# --- the rules (pure) ---------------------------------------------------------------------------


def trace(channel: ChannelView, previous: ChannelTrace | None, at: float) -> ChannelTrace:
    """The channel's trace after this snapshot."""
    same_counts = previous is not None and (previous.delivered, previous.acked) == (channel.delivered, channel.acked)
    counted_since = previous.counted_since if same_counts and previous is not None else at
    if channel.unacked == 0:
        held_since = None
    elif previous is not None and previous.held_since is not None and previous.acked == channel.acked:
        held_since = previous.held_since
    else:
        held_since = at
    return ChannelTrace(channel.delivered, channel.acked, counted_since, held_since)


def channel_offences(channel: ChannelView, now: ChannelTrace, previous: ChannelTrace | None, *, at: float,
                     lease_seconds: float, settle_seconds: float, lease_until: float | None) -> list[str]:
    """What one worker channel did that an honest worker never does."""
    reasons = []
    for consumer in channel.consumers:
        if consumer.queue.startswith(_REPLY_TO):
            continue
        if consumer.exclusive:
            reasons.append(f"exclusive consumer on {consumer.queue}")
        if not consumer.ack_required:
            reasons.append(f"consumes {consumer.queue} without acks")
        elif consumer.prefetch != 1:
            reasons.append(f"prefetch {consumer.prefetch} on {consumer.queue}"
                           + (" (unlimited)" if consumer.prefetch == 0 else ""))
    if channel.gets_no_ack:
        reasons.append(f"took {channel.gets_no_ack} messages with basic.get without acks")
    dropped = channel.delivered - channel.acked - channel.unacked
    quiet = previous is not None and now.counted_since == previous.counted_since \
        and at - now.counted_since >= settle_seconds
    # At once only when the channel's consumers are listed: the consumer listing and the channel
    # counters come from two calls and may disagree for a moment, and with no consumer seen yet
    # can_hold would be 0 and an honest worker's first delivery would look dropped.
    listed = any(not c.queue.startswith(_REPLY_TO) for c in channel.consumers)
    if (listed and dropped > channel.can_hold) or (dropped > 0 and quiet):
        reasons.append(f"settled {dropped} deliveries without acking them ({channel.delivered} delivered, "
                       f"{channel.acked} acked, {channel.unacked} unacked)")
    if now.held_since is not None and at - now.held_since > lease_seconds \
            and (lease_until is None or at > lease_until):
        reasons.append(f"held {channel.unacked} deliveries unacked for {at - now.held_since:.0f}s "
                       f"(lease {lease_seconds:g}s) without acking any")
    return reasons


def judge(snapshot: Snapshot, memory: Mapping[str, ChannelTrace], *, trusted: Iterable[str], lease_seconds: float,
          settle_seconds: float) -> tuple[list[Verdict], dict[str, ChannelTrace]]:
    """The workers to eject, with why, and the traces to remember for the next snapshot."""
    trusted_users = set(trusted)
    traces: dict[str, ChannelTrace] = {}
    by_user: dict[str, list[ChannelView]] = {}
    for channel in snapshot.channels:
        if channel.user in trusted_users or channel.user not in snapshot.workers:
            continue
        traces[channel.name] = trace(channel, memory.get(channel.name), snapshot.at)
        by_user.setdefault(channel.user, []).append(channel)
    verdicts = []
    for user, channels in sorted(by_user.items()):
        worker = snapshot.workers[user]
        reasons: list[str] = []
        for channel in channels:
            found = channel_offences(channel, traces[channel.name], memory.get(channel.name), at=snapshot.at,
                                     lease_seconds=lease_seconds, settle_seconds=settle_seconds,
                                     lease_until=worker.lease_until)
            reasons += [f"{r} [channel {channel.name}]" for r in found]
        consumed = {c.queue for ch in channels for c in ch.consumers if not c.queue.startswith(_REPLY_TO)}
        allowed = worker.queues if worker.queues is not None else len(consumed) + 1
        held = sum(ch.unacked for ch in channels)
        if held > allowed:
            reasons.append(f"holds {held} unacked deliveries, more than its {allowed} queues")
        if reasons:
            verdicts.append(Verdict(worker, tuple(reasons), {"channels": [_evidence(ch) for ch in channels]}))
    return verdicts, traces


def _evidence(channel: ChannelView) -> dict[str, Any]:
    return {
        "channel": channel.name, "connection": channel.connection, "prefetch": channel.prefetch,
        "delivered": channel.delivered, "acked": channel.acked, "unacked": channel.unacked,
        "gets_no_ack": channel.gets_no_ack,
        "consumers": [{"queue": c.queue, "exclusive": c.exclusive, "prefetch": c.prefetch,
                       "ack_required": c.ack_required} for c in channel.consumers],
    }


# --- reading the management API -----------------------------------------------------------------


def channel_views(channels: list[dict[str, Any]], consumers: list[dict[str, Any]]) -> tuple[ChannelView, ...]:
    """The management API's channel and consumer listings as the rules see them."""
    by_channel: dict[str, list[ConsumerView]] = {}
    for c in consumers:
        details = c.get("channel_details") or {}
        by_channel.setdefault(str(details.get("name", "")), []).append(ConsumerView(
            queue=str((c.get("queue") or {}).get("name", "")), exclusive=bool(c.get("exclusive")),
            prefetch=int(c.get("prefetch_count") or 0), ack_required=bool(c.get("ack_required", True))))
    views = []
    for ch in channels:
        stats = ch.get("message_stats") or {}
        views.append(ChannelView(
            name=str(ch.get("name", "")), connection=str((ch.get("connection_details") or {}).get("name", "")),
            user=str(ch.get("user", "")), prefetch=int(ch.get("prefetch_count") or 0),
            unacked=int(ch.get("messages_unacknowledged") or 0),
            delivered=int(stats.get("deliver", 0)) + int(stats.get("get", 0)), acked=int(stats.get("ack", 0)),
            gets_no_ack=int(stats.get("get_no_ack", 0)),
            consumers=tuple(by_channel.get(str(ch.get("name", "")), ())),
        ))
    return tuple(views)


# --- the service --------------------------------------------------------------------------------


class Watchdog:
    def __init__(self, engine: AsyncEngine, management: Management, vhost: str, *, trusted: Iterable[str],
                 lease_seconds: float, settle_seconds: float) -> None:
        self._engine = engine
        self._management = management
        self._vhost = vhost
        self._accounts = BrokerAccounts(management, vhost)
        self._trusted = frozenset(trusted)
        self._lease_seconds = lease_seconds
        self._settle_seconds = settle_seconds
        self._memory: dict[str, ChannelTrace] = {}

    @classmethod
    def from_settings(cls, settings: Settings, engine: AsyncEngine) -> Watchdog:
        vhost = vhost_of(settings.worker_amqp_url or settings.rabbitmq_url)  # where the workers log in
        return cls(engine, Management(settings.rabbitmq_management_url), vhost,
                   trusted=settings.trusted_amqp_users, lease_seconds=settings.lease_min_seconds,
                   settle_seconds=3 * settings.watchdog_stats_seconds)

    async def run(self, interval: float) -> None:
        log.info("broker watchdog watching vhost %s every %gs", self._vhost, interval)
        failing = False
        try:
            while True:
                try:
                    await self.tick()
                    failing = False
                except asyncio.CancelledError:
                    raise
                except ManagementError as exc:  # said once per outage, not every tick
                    if not failing:
                        log.warning("watchdog cannot read the management API (%s); retrying every %gs", exc, interval)
                    failing = True
                except Exception:  # the database hiccuped, or a bug: try again next tick
                    log.exception("watchdog tick failed")
                await asyncio.sleep(interval)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._management.aclose()

    async def tick(self) -> list[Verdict]:
        channels = await self._management.channels(self._vhost)
        consumers = await self._management.consumers(self._vhost)
        views = channel_views(channels, consumers)
        users = {v.user for v in views} - self._trusted
        snapshot = Snapshot(at=time.time(), channels=views, workers=await self._workers(users) if users else {})
        verdicts, self._memory = judge(snapshot, self._memory, trusted=self._trusted,
                                       lease_seconds=self._lease_seconds, settle_seconds=self._settle_seconds)
        for verdict in verdicts:
            await self.eject(verdict)
        return verdicts

    async def _workers(self, users: set[str]) -> dict[str, WorkerView]:
        """The registered workers logging in as ``users`` (a user shared by several workers is
        judged for none: only per-worker users are untrusted volunteers)."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(workers.c.id, workers.c.name, workers.c.owner_id,
                                                 workers.c.amqp_user, workers.c.models)
                                       .where(workers.c.amqp_user.in_(users)))).all()
            ids = [r.id for r in rows]
            leases = dict((await conn.execute(
                sa.select(jobs.c.worker_id, sa.func.max(jobs.c.lease_deadline))
                .where(jobs.c.state == CLAIMED, jobs.c.worker_id.in_(ids)).group_by(jobs.c.worker_id)
            )).all()) if ids else {}
        found: dict[str, list[WorkerView]] = {}
        for r in rows:
            deadline: datetime | None = leases.get(r.id)
            found.setdefault(r.amqp_user, []).append(WorkerView(
                id=r.id, name=r.name, owner_id=r.owner_id, amqp_user=r.amqp_user,
                queues=1,  # its own queue: the only one a worker may read
                lease_until=as_utc(deadline).timestamp() if deadline is not None else None))
        return {user: views[0] for user, views in found.items() if len(views) == 1}

    async def eject(self, verdict: Verdict) -> bool:
        """Suspend, flag and strike the worker and log the evidence (once, whichever API process
        gets there first), then shut it out of the broker. True if this call suspended it."""
        worker, reason = verdict.worker, "; ".join(verdict.reasons)
        async with self._engine.begin() as conn:
            suspended = (await conn.execute(
                sa.update(workers).where(workers.c.id == worker.id, workers.c.suspended_at.is_(None))
                .values(suspended_at=utcnow(), suspension_reason=f"watchdog: {reason}"[:4000], flagged=True,
                        strikes=workers.c.strikes + 1)
            )).rowcount == 1
            if suspended:
                await moderation.record(
                    conn, "watchdog", worker_id=worker.id, user_id=worker.owner_id,
                    detail={"worker": worker.name, "amqp_user": worker.amqp_user, "reasons": list(verdict.reasons),
                            **verdict.evidence})
        await self._shut_out(worker.amqp_user, reason)
        if suspended:
            log.warning("watchdog ejected worker %s (AMQP user %s): %s", worker.name, worker.amqp_user, reason)
        return suspended

    async def _shut_out(self, user: str, reason: str) -> None:
        """Delete the user: that closes its connections (what they held is requeued) and refuses any
        new login. Should the deletion fail, at least close its connections."""
        try:
            await self._accounts.revoke(user)
        except ManagementError as exc:
            log.warning("watchdog could not delete RabbitMQ user %s (%s); closing its connections", user, exc)
            await self._management.close_connections(user, reason=f"ejected by the horde: {reason}"[:200])

