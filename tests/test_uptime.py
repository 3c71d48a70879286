"""Uptime rewards: pure streak logic, and the uptime service with a real database, broker and ledger."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

from api.accounts import WorkerDirectory
from api.uptime import UptimeService
from broker.amqp import Publisher, amqp_user, connect
from broker.messages import WorkerHeartbeat
from config import Settings, load_model_reference
from config.database import make_async_engine
from ledger.rewards import Streak, due_intervals, observe, uptime_kudos
from tests.e2e import HordeClient

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_streak_grows_with_heartbeats_and_restarts_after_silence() -> None:
    streak = observe(None, at(0))
    for t in range(5, 1200, 5):
        streak = observe(streak, at(t), stale_after=300)
    assert streak.start == at(0) and streak.last_seen == at(1195)
    assert list(due_intervals(streak, interval=600)) == [1]
    restarted = observe(streak, at(1195 + 301), stale_after=300)
    assert restarted.start == at(1496) and restarted.paid_intervals == 0


def test_intervals_are_due_once() -> None:
    streak = Streak(start=at(0), last_seen=at(1850), paid_intervals=1)
    assert list(due_intervals(streak, interval=600)) == [2, 3]
    assert list(due_intervals(Streak(at(0), at(1850), 3), interval=600)) == []
    assert list(due_intervals(Streak(at(0), at(599), 0), interval=600)) == []


def test_uptime_amounts_follow_the_public_horde() -> None:
    assert uptime_kudos(kind="image", models=3) == 56
    assert uptime_kudos(kind="text", models=1, parameters_b=14) == 50
    assert uptime_kudos(kind="text", models=1, parameters_b=0.1) == 6.25


def beat(name: str, models: list[str]) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker=name, models=models, state="idle", sent_at=T0)


def test_uptime_is_paid_to_the_owner_once_per_interval(horde: HordeClient, settings: Settings) -> None:
    """Heartbeats through the real service, database, broker and ledger, with the clock in our hands."""
    owner = horde.user("uptime-owner")
    horde.register_worker("w-uptime", owner)

    async def scenario() -> None:
        engine = make_async_engine(settings.resolved_database_url)
        connection = await connect(settings.rabbitmq_url, name="test-uptime")
        try:
            publisher = await Publisher.open(connection, user_id=amqp_user(settings.rabbitmq_url))
            workers = WorkerDirectory(engine)
            service = UptimeService(engine, publisher, workers, load_model_reference(settings.model_reference),
                                    interval_seconds=600, stale_seconds=300)
            worker = await workers.get("w-uptime")
            heartbeat = beat("w-uptime", ["tiny-e2e", "tiny-prio"])
            paid = []
            for t in range(0, 1265, 5):  # 21 minutes online: two whole intervals
                paid += await service.record(worker, heartbeat, at=at(t))
                if t in (700, 1210):  # the same heartbeat again, and one from another API process
                    paid += await service.record(worker, heartbeat, at=at(t))
            assert [e.interval for e in paid] == [1, 2]
            # Silent for 6 minutes: the clock restarts, and 9 more minutes earn nothing yet.
            for t in range(1260 + 360, 1260 + 360 + 540, 5):
                paid += await service.record(worker, heartbeat, at=at(t))
            assert [e.interval for e in paid] == [1, 2]
            # Replays of already-paid intervals reach the ledger again and change nothing there.
            for event in paid:
                await publisher.publish("horde.events", "kudos.uptime", event,
                                        message_id=f"replay-{event.interval}")
        finally:
            await connection.close()
            await engine.dispose()

    asyncio.run(scenario())
    reward = uptime_kudos(kind="image", models=2)
    horde.wait_balance(owner, 2 * reward)
    time.sleep(1.0)  # let the replays reach the ledger too
    assert horde.balance(owner) == pytest.approx(2 * reward)
