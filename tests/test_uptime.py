"""Uptime rewards: pure streak logic, and the uptime service with a real database, broker and ledger."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from api.accounts import WorkerDirectory, WorkerRecord
from api.tables import users, worker_uptime, workers
from api.uptime import Beat, UptimeService
from broker.amqp import Publisher, amqp_user, connect
from broker.errors import BrokerUnavailable
from broker.messages import UptimeEarned, WorkerHeartbeat
from config import ModelReference, Settings, load_model_reference
from config.database import as_utc, make_async_engine, make_sync_engine
from ledger.rewards import Streak, due_intervals, observe, uptime_kudos
from tests import services
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


# --- grouped recording, on SQLite and on PostgreSQL, with a publisher that records what it sends ---


class RecordingPublisher:
    """Stands in for broker.amqp.Publisher: keeps each uptime event by message id; can fail some workers'."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, UptimeEarned]] = []
        self.dead: list[object] = []
        self.failing: set[int] = set()  # worker ids whose events the "broker" refuses

    async def publish(self, exchange: str, routing_key: str, message: UptimeEarned, *, message_id: str,
                      **extra: object) -> None:
        await asyncio.sleep(0)  # a real publish yields; concurrent ones interleave
        if message.worker_id in self.failing:
            raise BrokerUnavailable("the broker is down (test)")
        self.sent.append((message_id, message))

    async def dead_letter(self, message: object, *, queue: str, reason: str) -> None:
        self.dead.append(message)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of its own, migrated, with one owner; each test adds the workers it needs."""
    with services.migrated_database(request.param, tmp_path_factory.mktemp("uptime"),
                                    prefix="horde_uptime_test") as url:
        yield url


def add_workers(url: str, count: int) -> list[WorkerRecord]:
    engine = make_sync_engine(url)
    try:
        with engine.begin() as conn:
            insert_owner = sa.insert(users).values(alias="owner", created_at=T0).returning(users.c.id)
            owner = conn.execute(insert_owner).scalar_one()
            records = []
            for _ in range(count):
                name, amqp = f"w-{uuid.uuid4().hex[:10]}", f"amqp-{uuid.uuid4().hex[:10]}"
                worker_id = conn.execute(sa.insert(workers).values(name=name, owner_id=owner, amqp_user=amqp,
                                                                   created_at=T0).returning(workers.c.id)).scalar_one()
                records.append(WorkerRecord(worker_id, name, owner, amqp))
            return records
    finally:
        engine.dispose()


def stored(url: str, ids: list[int]) -> list[tuple[object, ...]]:
    """Each worker's streak row (None if it has none) and the models the workers table says it serves."""
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            rows = {r.worker_id: (as_utc(r.streak_start), as_utc(r.last_seen), r.paid_intervals)
                    for r in conn.execute(sa.select(worker_uptime).where(worker_uptime.c.worker_id.in_(ids)))}
            models = dict(conn.execute(sa.select(workers.c.id, workers.c.models).where(workers.c.id.in_(ids))).all())
        return [(rows.get(i), models[i]) for i in ids]
    finally:
        engine.dispose()


def new_service(engine: AsyncEngine, publisher: RecordingPublisher) -> UptimeService:
    return UptimeService(engine, publisher, WorkerDirectory(engine), ModelReference([]),  # type: ignore[arg-type]
                         interval_seconds=600, stale_seconds=300)


def timeline() -> list[tuple[int, datetime, list[str]]]:
    """(worker index, arrival, models) of 3 workers over 31 minutes: worker 0 sometimes beats twice in a
    row (and once the same beat twice), worker 1 changes its models, worker 2 falls silent for 6 minutes."""
    beats = []
    for t in range(0, 1860, 5):
        beats.append((0, at(t), ["a"]))
        if t % 60 == 0:
            beats.append((0, at(t + 1), ["a"]))
        if t == 605:
            beats.append((0, at(t), ["a"]))
        beats.append((1, at(t + 2), ["a", "b"] if t < 1000 else ["c"]))
        if not 400 <= t < 760:
            beats.append((2, at(t + 3), []))
    return beats


def run_async(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_grouped_heartbeats_earn_what_they_earn_one_at_a_time(db_url: str) -> None:
    alone, grouped = add_workers(db_url, 3), add_workers(db_url, 3)
    beats = timeline()

    async def scenario() -> tuple[RecordingPublisher, RecordingPublisher, list[list[UptimeEarned]],
                                  list[list[UptimeEarned]]]:
        engine = make_async_engine(db_url)
        one, many = RecordingPublisher(), RecordingPublisher()
        try:
            service = new_service(engine, one)
            paid_alone = [await service.record(alone[i], beat("x", models), at=t) for i, t, models in beats]
            service = new_service(engine, many)
            paid_grouped: list[list[UptimeEarned]] = []
            for start in range(0, len(beats), 50):  # 50 beats a group: ~80 s, several beats per worker
                group = [(grouped[i], beat("x", models), t) for i, t, models in beats[start:start + 50]]
                paid_grouped += await service.record_many(group)
        finally:
            await engine.dispose()
        return one, many, paid_alone, paid_grouped

    one, many, paid_alone, paid_grouped = run_async(scenario())

    def same(e: UptimeEarned) -> tuple[object, ...]:
        return e.streak_start, e.interval, e.kudos

    assert [[same(e) for e in p] for p in paid_alone] == [[same(e) for e in p] for p in paid_grouped]
    assert sum(len(p) for p in paid_alone) == 3 + 3 + 1  # worker 2 restarted its streak at 763 s
    as_alone = {a.id: g.id for a, g in zip(alone, grouped, strict=True)}

    def renamed(message_id: str, worker_id: int) -> str:
        return message_id.replace(f"uptime:{worker_id}:", f"uptime:{as_alone[worker_id]}:")

    assert sorted(renamed(mid, e.worker_id) for mid, e in one.sent) == sorted(mid for mid, _ in many.sent)
    assert stored(db_url, [w.id for w in alone]) == stored(db_url, [w.id for w in grouped])
    assert stored(db_url, [grouped[1].id])[0][1] == ["c"]


def test_a_group_recorded_twice_announces_each_interval_under_one_key(db_url: str) -> None:
    """Twice in a row (the streak says it is paid) and twice at once (two API processes: both
    announce it, under the same message id, which the ledger's keys pay once)."""
    first, second = add_workers(db_url, 2), add_workers(db_url, 2)

    def group(pair: list[WorkerRecord]) -> list[Beat]:
        return [(w, beat("x", ["a"]), at(t)) for t in range(0, 1210, 5) for w in pair]

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        engine = make_async_engine(db_url)
        try:
            once, again = RecordingPublisher(), RecordingPublisher()
            await new_service(engine, once).record_many(group(first))
            await new_service(engine, again).record_many(group(first))
            both = RecordingPublisher()
            a, b = new_service(engine, both), new_service(engine, both)
            await asyncio.gather(a.record_many(group(second)), b.record_many(group(second)))
        finally:
            await engine.dispose()
        return [m for m, _ in once.sent], [m for m, _ in again.sent], [m for m, _ in both.sent]

    once, again, both = run_async(scenario())
    assert len(once) == 4 and len(set(once)) == 4
    assert again == []
    assert len(set(both)) == 4  # each of the 4 intervals under one key, however many times announced
    for row, _ in stored(db_url, [w.id for w in first + second]):
        assert row is not None and row[2] == 2


def test_a_worker_whose_events_were_not_published_is_not_marked_paid(db_url: str) -> None:
    down, up = add_workers(db_url, 2)

    async def scenario() -> tuple[list[str], list[str]]:
        engine = make_async_engine(db_url)
        publisher = RecordingPublisher()
        try:
            service = new_service(engine, publisher)
            await service.record_many([(w, beat("x", ["a"]), at(t)) for t in range(0, 600, 5) for w in (down, up)])
            publisher.failing = {down.id}
            with pytest.raises(BrokerUnavailable):
                await service.record_many([(w, beat("x", ["a"]), at(610)) for w in (down, up)])
            before_retry = [m for m, _ in publisher.sent]
            publisher.failing = set()
            await service.record_many([(w, beat("x", ["a"]), at(615)) for w in (down, up)])
        finally:
            await engine.dispose()
        return before_retry, [m for m, _ in publisher.sent]

    before_retry, after = run_async(scenario())
    start = int(at(0).timestamp())
    assert before_retry == [f"uptime:{up.id}:{start}:1"]
    assert after == before_retry + [f"uptime:{down.id}:{start}:1"]  # announced again, then paid
    assert [row for row, _ in stored(db_url, [down.id, up.id])] == [(at(0), at(615), 1)] * 2


def test_a_first_streak_recorded_concurrently_leaves_the_rest_of_the_group_saved(db_url: str) -> None:
    """Another API process inserts a worker's first streak between our SELECT and our INSERT."""
    raced, other = add_workers(db_url, 2)

    async def scenario() -> None:
        engine = make_async_engine(db_url)
        try:
            service = new_service(engine, RecordingPublisher())
            read = service._streaks

            async def read_then_race(ids: set[int]) -> dict[int, Streak]:
                streaks = await read(ids)
                async with engine.begin() as conn:
                    await conn.execute(sa.insert(worker_uptime).values(
                        worker_id=raced.id, streak_start=at(-5), last_seen=at(-5), paid_intervals=0))
                return streaks

            service._streaks = read_then_race  # type: ignore[method-assign]
            await service.record_many([(w, beat("x", ["a"]), at(0)) for w in (raced, other)])
        finally:
            await engine.dispose()

    run_async(scenario())
    assert stored(db_url, [raced.id, other.id]) == [((at(-5), at(-5), 0), None), ((at(0), at(0), 0), ["a"])]


class FakeDelivery:
    """An incoming heartbeat as the uptime service sees it; remembers how it was settled."""

    def __init__(self, worker: WorkerRecord, *, user_id: str | None = None, body: bytes | None = None) -> None:
        self.body = body if body is not None else beat(worker.name, ["a"]).encode()
        self.type = WorkerHeartbeat.schema_name
        self.user_id = user_id or worker.amqp_user
        self.routing_key = f"worker.heartbeat.{worker.name}"
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("reject")


def test_handle_groups_authentic_heartbeats_and_settles_every_delivery(db_url: str) -> None:
    crew = add_workers(db_url, 5)

    async def scenario() -> tuple[list[int], list[FakeDelivery], list[FakeDelivery], FakeDelivery, RecordingPublisher]:
        engine = make_async_engine(db_url)
        publisher = RecordingPublisher()
        try:
            service = new_service(engine, publisher)
            sizes: list[int] = []
            record_many = service.record_many

            async def counted(beats: list[Beat]) -> list[list[UptimeEarned]]:
                sizes.append(len(beats))
                return await record_many(beats)

            service.record_many = counted  # type: ignore[method-assign]
            good = [FakeDelivery(w) for w in crew for _ in range(8)]
            forged = [FakeDelivery(w, user_id="mallory") for w in crew[:2]]
            malformed = FakeDelivery(crew[0], body=b"{not json")
            await asyncio.gather(*(service.handle(m) for m in [*good, *forged, malformed]))  # type: ignore[arg-type]
        finally:
            await engine.dispose()
        return sizes, good, forged, malformed, publisher

    sizes, good, forged, malformed, publisher = run_async(scenario())
    assert sum(sizes) == len(good) and len(sizes) < len(good)  # grouped, nothing lost
    assert all(m.settled == ["ack"] for m in good)
    assert all(m.settled == ["reject"] for m in forged)
    assert malformed.settled == ["ack"] and publisher.dead == [malformed]
    assert all(row is not None for row, _ in stored(db_url, [w.id for w in crew]))


def test_handle_acks_heartbeats_whose_group_failed(db_url: str) -> None:
    (worker,) = add_workers(db_url, 1)

    async def scenario() -> FakeDelivery:
        engine = make_async_engine(db_url)
        try:
            service = new_service(engine, RecordingPublisher())

            async def broken(ids: set[int]) -> dict[int, Streak]:
                raise sa.exc.OperationalError("SELECT", {}, Exception("database down (test)"))

            service._streaks = broken  # type: ignore[method-assign]
            delivery = FakeDelivery(worker)
            await service.handle(delivery)  # type: ignore[arg-type]
            return delivery
        finally:
            await engine.dispose()

    assert run_async(scenario()).settled == ["ack"]


def test_a_group_recorded_twice_at_once_is_paid_once_by_the_ledger(horde: HordeClient, settings: Settings) -> None:
    """The real broker and ledger: two API processes record the same group of two workers at once."""
    owner = horde.user("uptime-group-owner")
    horde.register_worker("w-uptime-g1", owner)
    horde.register_worker("w-uptime-g2", owner)

    async def scenario() -> None:
        engine = make_async_engine(settings.resolved_database_url)
        connection = await connect(settings.rabbitmq_url, name="test-uptime-group")
        try:
            publisher = await Publisher.open(connection, user_id=amqp_user(settings.rabbitmq_url))
            directory = WorkerDirectory(engine)
            reference = load_model_reference(settings.model_reference)
            a, b = (UptimeService(engine, publisher, directory, reference, interval_seconds=600, stale_seconds=300)
                    for _ in range(2))
            pair = [await directory.get("w-uptime-g1"), await directory.get("w-uptime-g2")]
            group = [(w, beat(w.name, ["tiny-e2e"]), at(t)) for t in range(0, 605, 5) for w in pair if w]
            await asyncio.gather(a.record_many(group), b.record_many(group))
            await a.record_many(group)  # and once more, later
        finally:
            await connection.close()
            await engine.dispose()

    asyncio.run(scenario())
    reward = uptime_kudos(kind="image", models=1)
    horde.wait_balance(owner, 2 * reward)
    time.sleep(1.0)  # let any duplicate reach the ledger too
    assert horde.balance(owner) == pytest.approx(2 * reward)
