"""The uptime service: turns workers' heartbeats into uptime rewards for their owners.

It consumes ``horde.heartbeats``. A heartbeat counts only if it is authentic (broker-validated
``user_id`` of the registered worker named in the routing key and body). The worker's streak
(``worker_uptime``) is extended or restarted (ledger.rewards), and each completed interval not
paid yet is announced to the ledger as a trusted ``kudos.uptime`` event whose message id names
the worker, the streak and the interval. The events are published before the streak row records
them as paid: if anything fails in between, the next heartbeat announces them again and the
ledger's unique keys keep the payment single.

Authentic heartbeats are recorded in groups, like submissions in api/intake.py: whatever arrives
while a group is being written waits for the next one, and a lone heartbeat is recorded at once
(no timer). A group costs one SELECT of the streaks and one transaction (one commit, one WAL
flush) instead of one of each per heartbeat. A worker that appears twice in a group has its beats
folded in order, so the streak and the payments are those of recording them one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.accounts import WorkerDirectory, WorkerRecord
from api.grouping import Groups
from api.tables import worker_uptime, workers
from broker.amqp import Publisher
from broker.errors import BadMessage, BrokerError
from broker.messages import UptimeEarned, WorkerHeartbeat, decode
from broker.topology import EVENTS_EXCHANGE, HEARTBEATS_QUEUE, UPTIME_KEY, worker_of
from config import ModelKind, ModelReference
from config.database import as_utc, utcnow
from ledger.rewards import Streak, due_intervals, observe, uptime_kudos

log = logging.getLogger(__name__)

MAX_BEATS_PER_GROUP = 256  # keeps the streaks' ``IN (...)`` list well under the drivers' bind limits

#: What the recording of one heartbeat needs: who sent it, what it says, and when it arrived.
Beat = tuple[WorkerRecord, WorkerHeartbeat, datetime]

# Executemany statements, compiled once and cached. The bind names differ from the column names,
# which SQLAlchemy reserves for the SET clause.
_UPDATE_STREAK = (
    sa.update(worker_uptime)
    # Conditional on the streak we read: of two concurrent writers one wins, the other leaves it;
    # the ledger's keys make any interval both announced paid only once.
    .where(worker_uptime.c.worker_id == sa.bindparam("b_worker"),
           worker_uptime.c.streak_start == sa.bindparam("b_before", type_=worker_uptime.c.streak_start.type))
    .values(streak_start=sa.bindparam("b_start", type_=worker_uptime.c.streak_start.type),
            last_seen=sa.bindparam("b_seen", type_=worker_uptime.c.last_seen.type),
            paid_intervals=sa.bindparam("b_paid"))
)
_INSERT_STREAK = sa.insert(worker_uptime)
_UPDATE_MODELS = (
    sa.update(workers)
    .where(workers.c.id == sa.bindparam("b_worker"))
    .values(models=sa.bindparam("b_models", type_=workers.c.models.type))
)


@dataclass
class _Fold:
    """One worker's beats of a group, folded in order onto the streak read from the database."""

    worker: WorkerRecord
    before: Streak | None  # the row as read: the condition of its update (None: insert it)
    streak: Streak | None = None  # after the beats folded so far, paid intervals included
    models: tuple[str, ...] = ()  # what its last beat said it serves
    events: list[tuple[str, UptimeEarned]] = field(default_factory=list)  # (message id, event)

    @property
    def row(self) -> dict[str, Any]:
        assert self.streak is not None
        return {"worker_id": self.worker.id, "streak_start": self.streak.start,
                "last_seen": self.streak.last_seen, "paid_intervals": self.streak.paid_intervals}


@dataclass
class _Waiting:
    beat: Beat
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class UptimeService:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, workers: WorkerDirectory, models: ModelReference,
                 *, interval_seconds: float, stale_seconds: float) -> None:
        self._engine = engine
        # The streaks' SELECT is a lone read: autocommit saves its BEGIN/ROLLBACK round trips.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._publisher = publisher
        self._workers = workers
        self._models = models
        self._interval = interval_seconds
        self._stale = stale_seconds
        self._models_of: dict[int, tuple[str, ...]] = {}  # what each worker last said it serves
        self._groups: Groups[_Waiting] = Groups(self._record_group, max_size=MAX_BEATS_PER_GROUP)

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
        waiting = _Waiting((worker, beat, utcnow()))
        self._groups.add(waiting)
        await waiting.done  # a group's errors are logged by it, once: see _record_group
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

    # --- grouping ----------------------------------------------------------------------------------

    async def _record_group(self, group: list[_Waiting]) -> None:
        try:
            await self.record_many([w.beat for w in group])
        except (SQLAlchemyError, BrokerError, OSError) as exc:
            log.error("%d heartbeat(s) not (all) recorded (%s); the next ones will catch up", len(group), exc)
        except Exception as exc:  # a bug: the handlers raise it, as one heartbeat's would
            log.exception("recording %d heartbeat(s) failed", len(group))
            _release(group, exc)
        finally:
            _release(group)  # never leave a handler waiting: its delivery would stay unacked

    # --- recording -----------------------------------------------------------------------------------

    async def record(self, worker: WorkerRecord, beat: WorkerHeartbeat, *, at: datetime) -> list[UptimeEarned]:
        """Extend the worker's streak to ``at`` and pay the intervals it completed; returns the payments."""
        return (await self.record_many([(worker, beat, at)]))[0]

    async def record_many(self, beats: Sequence[Beat]) -> list[list[UptimeEarned]]:
        """Record a group of heartbeats (in the order given); returns each one's payments.

        One SELECT, one burst of concurrent publishes, one transaction. A worker whose events could
        not all be published keeps its row as it was (its next heartbeat announces them again); the
        others are saved, then the first publish error is raised.
        """
        if not beats:
            return []
        before = await self._streaks({worker.id for worker, _, _ in beats})
        folds: dict[int, _Fold] = {}
        earned: list[list[UptimeEarned]] = []
        for worker, beat, at in beats:
            fold = folds.setdefault(worker.id, _Fold(worker, before.get(worker.id)))
            earned.append(self._observe(fold, beat, at))
        outcomes = await asyncio.gather(*(self._announce(f) for f in folds.values()), return_exceptions=True)
        announced = [f for f, outcome in zip(folds.values(), outcomes, strict=True) if outcome is None]
        await self._save(announced)
        for fold in announced:
            if fold.events:
                log.info("worker %s: %d uptime interval(s) paid to owner %d",
                         fold.worker.name, len(fold.events), fold.worker.owner_id)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return earned

    async def _streaks(self, worker_ids: set[int]) -> dict[int, Streak]:
        async with self._reader.connect() as conn:
            rows = await conn.execute(sa.select(worker_uptime).where(worker_uptime.c.worker_id.in_(worker_ids)))
            return {row.worker_id: Streak(as_utc(row.streak_start), as_utc(row.last_seen), row.paid_intervals)
                    for row in rows}

    def _observe(self, fold: _Fold, beat: WorkerHeartbeat, at: datetime) -> list[UptimeEarned]:
        """Fold one heartbeat onto the worker's streak, as recording it alone would; returns what it earned."""
        streak = observe(fold.streak or fold.before, at, stale_after=self._stale)
        earned = [
            UptimeEarned(worker_id=fold.worker.id, worker_name=fold.worker.name, owner_id=fold.worker.owner_id,
                         streak_start=streak.start, interval=n, kudos=self._reward(beat))
            for n in due_intervals(streak, interval=self._interval)
        ]
        paid = earned[-1].interval if earned else streak.paid_intervals
        fold.streak = Streak(streak.start, streak.last_seen, paid)
        fold.models = tuple(sorted(beat.models))
        fold.events += [(f"uptime:{e.worker_id}:{int(e.streak_start.timestamp())}:{e.interval}", e) for e in earned]
        return earned

    async def _announce(self, fold: _Fold) -> None:
        await asyncio.gather(*(self._publisher.publish(EVENTS_EXCHANGE, UPTIME_KEY, event, message_id=message_id)
                               for message_id, event in fold.events))

    def _reward(self, beat: WorkerHeartbeat) -> float:
        specs = [spec for name in beat.models if (spec := self._models.get(name)) is not None]
        if specs and all(spec.kind == ModelKind.text for spec in specs):
            return uptime_kudos(kind="text", models=len(specs), parameters_b=max(s.parameters_b for s in specs))
        return uptime_kudos(kind="image", models=len(specs))

    async def _save(self, folds: list[_Fold]) -> None:
        """Write the streaks, and the models of workers whose models changed, in one transaction.

        An insert that meets a row means a concurrent writer (another API process) recorded the
        worker's first streak meanwhile: the group is then written one worker at a time, and that
        worker's row is left to the other writer, as the conditional update would leave it.
        """
        if not folds:
            return
        try:
            async with self._engine.begin() as conn:
                await self._write(conn, folds)
        except IntegrityError:
            if len(folds) == 1:
                log.debug("worker %d: its first streak was recorded concurrently", folds[0].worker.id)
                return
            for fold in folds:
                await self._save([fold])
            return
        # The models are remembered only once committed, so a failed write is retried next time.
        self._models_of.update((f.worker.id, f.models) for f in folds)

    async def _write(self, conn: AsyncConnection, folds: Sequence[_Fold]) -> None:
        updates = [{"b_worker": f.worker.id, "b_before": f.before.start, "b_start": f.row["streak_start"],
                    "b_seen": f.row["last_seen"], "b_paid": f.row["paid_intervals"]}
                   for f in folds if f.before is not None]  # the streak read: the update's condition
        inserts = [f.row for f in folds if f.before is None]
        # Record the models a worker serves (``/status/models`` counts and ``is_possible`` read
        # them) only when they changed since its last heartbeat here.
        models = [{"b_worker": f.worker.id, "b_models": list(f.models)}
                  for f in folds if self._models_of.get(f.worker.id) != f.models]
        if updates:
            await conn.execute(_UPDATE_STREAK, updates)
        if inserts:
            await conn.execute(_INSERT_STREAK, inserts)
        if models:
            await conn.execute(_UPDATE_MODELS, models)


def _release(group: list[_Waiting], error: BaseException | None = None) -> None:
    for waiting in group:
        if waiting.done.done():
            continue
        if error is None:
            waiting.done.set_result(None)
        else:
            waiting.done.set_exception(error)
