"""The uptime service: turns workers' heartbeats into uptime rewards for their owners.

It consumes ``horde.heartbeats``. A heartbeat counts only if it is authentic (broker-validated
``user_id`` of the registered worker named in the routing key and body). The worker's streak
(``worker_uptime``) is extended or restarted (ledger.rewards), and each completed interval not
paid yet is announced to the ledger as a trusted ``kudos.uptime`` event whose message id names
the worker, the streak and the interval. The events are published before the streak row records
them as paid: if anything fails in between, the next heartbeat announces them again and the
ledger's unique keys keep the payment single.
"""

from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api.accounts import WorkerDirectory, WorkerRecord
from api.tables import worker_uptime, workers
from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import UptimeEarned, WorkerHeartbeat, decode
from broker.topology import EVENTS_EXCHANGE, HEARTBEATS_QUEUE, UPTIME_KEY, worker_of
from config import ModelKind, ModelReference
from config.database import as_utc, utcnow
from ledger.rewards import Streak, due_intervals, observe, uptime_kudos

log = logging.getLogger(__name__)


class UptimeService:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, workers: WorkerDirectory, models: ModelReference,
                 *, interval_seconds: float, stale_seconds: float) -> None:
        self._engine = engine
        self._publisher = publisher
        self._workers = workers
        self._models = models
        self._interval = interval_seconds
        self._stale = stale_seconds
        self._models_of: dict[int, tuple[str, ...]] = {}  # what each worker last said it serves

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            beat = decode(WorkerHeartbeat, message.body, message.type)
        except BadMessage as exc:
            await self._dead_letter(message, exc)
            return
        try:
            worker = await self._workers.get(beat.worker)
        except (SQLAlchemyError, OSError) as exc:  # uncaught, the delivery would stay unacked forever
            log.error("heartbeat of %s dropped, database error: %s", beat.worker, exc)
            await message.ack()
            return
        if (worker is None or message.user_id != worker.amqp_user
                or worker_of(message.routing_key or "") != beat.worker):
            log.warning("dropped a heartbeat claiming worker %r from AMQP user %r", beat.worker, message.user_id)
            await message.reject(requeue=False)
            return
        try:
            await self.record(worker, beat, at=utcnow())
        except (SQLAlchemyError, BrokerError, OSError) as exc:
            log.error("heartbeat of %s not recorded (%s); the next one will catch up", worker.name, exc)
        await message.ack()  # heartbeats are not worth redelivering: the next one carries the same news

    async def _dead_letter(self, message: AbstractIncomingMessage, exc: BadMessage) -> None:
        """A malformed heartbeat goes to the dead letters (admins see it); its queue has no
        dead-letter exchange, so that expired heartbeats do not pile up there."""
        log.warning("dead-lettering a malformed heartbeat from %s: %s", message.user_id, exc)
        try:
            await self._publisher.dead_letter(message, queue=HEARTBEATS_QUEUE, reason="rejected")
        except BrokerError as error:
            log.warning("malformed heartbeat dropped, not dead-lettered: %s", error)
        await message.ack()

    async def record(self, worker: WorkerRecord, beat: WorkerHeartbeat, *, at: datetime) -> list[UptimeEarned]:
        """Extend the worker's streak to ``at`` and pay the intervals it completed; returns the payments."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(worker_uptime).where(worker_uptime.c.worker_id == worker.id))).first()
        before = Streak(as_utc(row.streak_start), as_utc(row.last_seen), row.paid_intervals) if row else None
        streak = observe(before, at, stale_after=self._stale)
        earned = [
            UptimeEarned(worker_id=worker.id, worker_name=worker.name, owner_id=worker.owner_id,
                         streak_start=streak.start, interval=n, kudos=self._reward(beat))
            for n in due_intervals(streak, interval=self._interval)
        ]
        for event in earned:
            await self._publisher.publish(
                EVENTS_EXCHANGE, UPTIME_KEY, event,
                message_id=f"uptime:{worker.id}:{int(streak.start.timestamp())}:{event.interval}")
        paid = earned[-1].interval if earned else streak.paid_intervals
        await self._save(worker.id, Streak(streak.start, streak.last_seen, paid), before)
        await self._note_models(worker.id, tuple(sorted(beat.models)))
        if earned:
            log.info("worker %s: %d uptime interval(s) paid to owner %d", worker.name, len(earned), worker.owner_id)
        return earned

    def _reward(self, beat: WorkerHeartbeat) -> float:
        specs = [spec for name in beat.models if (spec := self._models.get(name)) is not None]
        if specs and all(spec.kind == ModelKind.text for spec in specs):
            return uptime_kudos(kind="text", models=len(specs), parameters_b=max(s.parameters_b for s in specs))
        return uptime_kudos(kind="image", models=len(specs))

    async def _note_models(self, worker_id: int, models: tuple[str, ...]) -> None:
        """Record the models a worker serves (``/status/models`` counts and ``is_possible`` read
        them), only when they changed since its last heartbeat here."""
        if self._models_of.get(worker_id) == models:
            return
        async with self._engine.begin() as conn:
            await conn.execute(sa.update(workers).where(workers.c.id == worker_id).values(models=list(models)))
        self._models_of[worker_id] = models

    async def _save(self, worker_id: int, streak: Streak, before: Streak | None) -> None:
        values = {"streak_start": streak.start, "last_seen": streak.last_seen, "paid_intervals": streak.paid_intervals}
        try:
            async with self._engine.begin() as conn:
                if before is None:
                    await conn.execute(sa.insert(worker_uptime).values(worker_id=worker_id, **values))
                else:
                    # Conditional on the streak we read: of two concurrent writers one wins, the other
                    # leaves it; the ledger's keys make any interval both announced paid only once.
                    await conn.execute(
                        sa.update(worker_uptime)
                        .where(worker_uptime.c.worker_id == worker_id, worker_uptime.c.streak_start == before.start)
                        .values(**values))
        except IntegrityError:
            log.debug("worker %d: its first streak was recorded concurrently", worker_id)
