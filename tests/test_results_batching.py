"""Completions processed in groups (api/results.py): one file hop, one transaction and a burst of
confirmed ``job.done`` publishes for many completions, each message acked after its own event.

The results service runs in the test's event loop, on a database and a vhost of this module's own
(real PostgreSQL, real RabbitMQ), so no ledger settles these made-up jobs and every ``job.done``
can be counted in a queue bound here. Deliveries are stand-ins that record ack, nack and reject:
handed to ``handle`` together, as the consumer does with its prefetch, they form groups.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa

from api import job_store, results
from api.accounts import WorkerDirectory, WorkerRecord, create_user, create_worker
from api.result_store import ResultStore
from api.results import ResultsService
from api.tables import jobs, moderation_log, workers
from broker.amqp import Publisher, amqp_user, connect
from broker.messages import JobCompleted, JobDone, JobsCompleted, JobsDone
from broker.topology import EVENTS_EXCHANGE, JOB_DONE_KEY, completed_key
from config.database import make_async_engine, make_sync_engine, utcnow
from ledger.pricing import billed_tokens, text_kudos
from ledger.units import to_kudos, to_units
from tests import services

IMAGE_PARAMS = {"width": 64, "height": 64, "steps": 4}
TEXT_PARAMS = {"max_length": 200, "max_context_length": 1024}
TEXT_MODEL, PARAMETERS_B = "tiny-text", 13.0


@dataclass
class Delivery:
    """A results-queue delivery as ``handle`` sees it; records how it was settled."""
    body: bytes
    type: str
    user_id: str | None
    routing_key: str
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject(requeue={requeue})")


@dataclass
class Rig:
    engine: Any
    sync: Any
    service: ResultsService
    done_queue: aio_pika.abc.AbstractQueue
    workers: dict[str, WorkerRecord]
    owner_id: int


@pytest.fixture(scope="module")
def private_services() -> Iterator[tuple[str, str]]:
    vhost = services.create_vhost()
    with services.migrated_database() as database:
        yield database, vhost
    services.delete_vhost(vhost)


@pytest.fixture
async def rig(private_services: tuple[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    database, vhost = private_services
    sync = make_sync_engine(database)
    engine = make_async_engine(database)
    connection = await connect(vhost, name="test-results-batching")
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        done_queue = await channel.declare_queue(exclusive=True)
        await done_queue.bind(exchange, routing_key=JOB_DONE_KEY)
        publisher = await Publisher.open(connection, user_id=amqp_user(vhost))
        suffix = uuid.uuid4().hex[:8]
        with sync.begin() as conn:
            owner, _ = create_user(conn, f"owner-{suffix}", pepper="test")
            records = {name: create_worker(conn, f"{name}-{suffix}", owner=owner, amqp_user=f"user-{name}-{suffix}")
                       for name in ("a", "b", "c")}
        directory = WorkerDirectory(engine)
        for record in records.values():  # cached, as in a running horde: lookups then take no round trip
            await directory.get(record.name)
        service = ResultsService(engine, publisher, directory, ResultStore(tmp_path / "results"), max_attempts=3)
        yield Rig(engine, sync, service, done_queue, records, owner.id)
    finally:
        await connection.close()
        await engine.dispose()
        sync.dispose()


def lease(rig: Rig, worker: WorkerRecord, *, kind: str = "image", price: int = 1000) -> tuple[str, str]:
    """A job claimed by ``worker`` under a fresh lease, as the claims service leaves it; (job id, lease id)."""
    job_id, lease_id, now = str(uuid.uuid4()), str(uuid.uuid4()), utcnow()
    params = IMAGE_PARAMS if kind == "image" else TEXT_PARAMS
    model = "tiny-image" if kind == "image" else TEXT_MODEL
    payload: dict[str, Any] = {"params": params, "parameters_b": {TEXT_MODEL: PARAMETERS_B}} if kind == "text" \
        else {"params": params}
    with rig.sync.begin() as conn:
        conn.execute(sa.insert(jobs).values(
            id=job_id, request_id=str(uuid.uuid4()), user_id=rig.owner_id, kind=kind, models=[model],
            payload=payload, tier=0, price=price, state="claimed", model=model, worker_id=worker.id,
            lease_id=lease_id, lease_deadline=now + timedelta(hours=1), attempts=0, created_at=now,
            published_at=now, claimed_at=now))
    return job_id, lease_id


def completion(job_id: str, lease_id: str, worker: WorkerRecord, *, text: str | None = None) -> JobCompleted:
    if text is not None:
        return JobCompleted(job_id=job_id, lease_id=lease_id, worker=worker.name, model=TEXT_MODEL, seed="7",
                            text=text, media_type="text/plain", generation_seconds=0.5)
    return JobCompleted(job_id=job_id, lease_id=lease_id, worker=worker.name, model="tiny-image", seed="7",
                        image=f"webp of {job_id}".encode(), width=64, height=64, generation_seconds=0.5)


def delivery(event: JobCompleted, sender: WorkerRecord) -> Delivery:
    """``event`` as ``sender`` publishes it: its own AMQP user and routing key."""
    return Delivery(event.encode(), event.schema_name, sender.amqp_user, completed_key(sender.name))


async def deliver_together(rig: Rig, deliveries: Sequence[Delivery]) -> None:
    await asyncio.gather(*(rig.service.handle(d) for d in deliveries))  # type: ignore[arg-type]


async def announcements(rig: Rig) -> list[list[JobDone]]:
    """The ``jobs-done.v1`` messages published so far (drained), each as its ``job.done`` events."""
    messages: list[list[JobDone]] = []
    while (message := await rig.done_queue.get(no_ack=True, fail=False)) is not None:
        assert message.type == JobsDone.schema_name and (message.message_id or "").startswith("jobs-done:")
        events = JobsDone.model_validate_json(message.body).events
        assert len({done.job_id for done in events}) == len(events)  # a job at most once per message
        messages.append(events)
    return messages


async def announced(rig: Rig) -> Counter[str]:
    """``job.done`` events published so far (drained), counted by job id."""
    return Counter(done.job_id for events in await announcements(rig) for done in events)


def job(rig: Rig, job_id: str) -> Any:
    with rig.sync.connect() as conn:
        return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()


def offences(rig: Rig, worker: WorkerRecord) -> list[Any]:
    with rig.sync.connect() as conn:
        return list(conn.execute(sa.select(moderation_log).where(moderation_log.c.worker_id == worker.id)
                                 .order_by(moderation_log.c.id)))


def strikes(rig: Rig, worker: WorkerRecord) -> int:
    with rig.sync.connect() as conn:
        return conn.execute(sa.select(workers.c.strikes).where(workers.c.id == worker.id)).scalar_one()


@pytest.fixture
def group_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each group's UPDATE, watched on its way to the database."""
    sizes: list[int] = []
    real = job_store.complete_many

    async def watched(conn: Any, completions: Sequence[job_store.Completion], now: Any) -> Any:
        sizes.append(len(completions))
        return await real(conn, completions, now)

    monkeypatch.setattr(job_store, "complete_many", watched)
    return sizes


async def test_a_group_of_completions_from_several_workers_all_become_done(
        rig: Rig, group_sizes: list[int]) -> None:
    senders = [rig.workers[name] for name in ("a", "b", "c") for _ in range(12)]
    leases = [lease(rig, worker) for worker in senders]
    events = [completion(job_id, lease_id, worker) for (job_id, lease_id), worker in zip(leases, senders, strict=True)]
    deliveries = [delivery(event, worker) for event, worker in zip(events, senders, strict=True)]

    await deliver_together(rig, deliveries)

    assert [d.settled for d in deliveries] == [["ack"]] * len(deliveries)
    # Grouped: far fewer UPDATEs than completions, at most MAX_COMPLETIONS_PER_GROUP each.
    assert sum(group_sizes) == len(events) and len(group_sizes) < len(events) // 4
    assert max(group_sizes) <= results.MAX_COMPLETIONS_PER_GROUP
    messages = await announcements(rig)  # one message per group, not one per job
    assert [len(m) for m in messages] == group_sizes
    assert Counter(done.job_id for m in messages for done in m) == Counter({event.job_id: 1 for event in events})
    for event, worker in zip(events, senders, strict=True):
        row = job(rig, event.job_id)
        assert (row.state, row.worker_id, row.seed, row.censored, row.price) == ("done", worker.id, "7", False, 1000)
        assert row.finished_at is not None
        assert Path(row.result_path).read_bytes() == event.image
    assert all(strikes(rig, worker) == 0 for worker in rig.workers.values())


async def test_stale_completions_in_a_group_are_refused_and_the_others_complete(
        rig: Rig, group_sizes: list[int]) -> None:
    a, b = rig.workers["a"], rig.workers["b"]
    good = [lease(rig, a) for _ in range(5)] + [lease(rig, b) for _ in range(5)]
    wrong_lease_job, _ = lease(rig, a)
    others_job, others_lease = lease(rig, b)
    text_job, text_lease = lease(rig, a, kind="text")
    good_events = [completion(job_id, lease_id, a if i < 5 else b) for i, (job_id, lease_id) in enumerate(good)]
    stale = [
        completion(wrong_lease_job, str(uuid.uuid4()), a),  # A's job, but not A's lease
        completion(others_job, others_lease, a),  # B's job and lease, completed by A in its own name
        completion(text_job, text_lease, a),  # A's lease, but an image for a text job
    ]
    deliveries = [delivery(e, a if i < 5 else b) for i, e in enumerate(good_events)]
    stale_deliveries = [delivery(e, a) for e in stale]

    await deliver_together(rig, deliveries[:5] + stale_deliveries + deliveries[5:])

    assert all(d.settled == ["ack"] for d in deliveries + stale_deliveries)  # refused ones are acked, as before
    assert sum(group_sizes) == len(good_events) and len(group_sizes) < len(good_events)
    assert await announced(rig) == Counter({event.job_id: 1 for event in good_events})
    assert all(job(rig, event.job_id).state == "done" for event in good_events)
    for job_id in (wrong_lease_job, others_job, text_job):
        row = job(rig, job_id)
        assert (row.state, row.result_path, row.finished_at) == ("claimed", None, None)
    logged = offences(rig, a)
    assert [o.kind for o in logged] == ["stale_completion"] * 3
    assert {o.detail["job_id"]: o.detail["why"] for o in logged} == {
        wrong_lease_job: "it does not hold the live lease", others_job: "it does not hold the live lease",
        text_job: "a image result for a text job"}
    assert strikes(rig, a) == 3 and strikes(rig, b) == 0


async def test_a_redelivered_completion_announces_again_and_changes_nothing(rig: Rig) -> None:
    a, c = rig.workers["a"], rig.workers["c"]
    first_job, first_lease = lease(rig, a)
    first = completion(first_job, first_lease, a)
    assert await rig.service.complete(first, a) is True  # bridge.py's path: a group of one
    before = job(rig, first_job)
    assert await announced(rig) == Counter({first_job: 1})

    # Redelivered (the ack was lost), in a group with a fresh completion and a second copy of itself.
    fresh_job, fresh_lease = lease(rig, c)
    again = [delivery(first, a), delivery(completion(fresh_job, fresh_lease, c), c), delivery(first, a)]
    await deliver_together(rig, again)

    assert [d.settled for d in again] == [["ack"]] * 3
    assert job(rig, first_job) == before  # same finished_at, path, price: the ledger dedupes the repeat
    assert job(rig, fresh_job).state == "done"
    assert await announced(rig) == Counter({first_job: 2, fresh_job: 1})
    assert strikes(rig, a) == 0 and offences(rig, a) == []  # its own repeat is no offence


async def test_a_text_job_in_a_group_is_priced_on_its_text_never_above_its_quote(rig: Rig) -> None:
    a, b = rig.workers["a"], rig.workers["b"]
    quote = to_units(text_kudos(tokens=TEXT_PARAMS["max_length"], parameters_b=PARAMETERS_B,
                                max_context_length=TEXT_PARAMS["max_context_length"]))
    short_job, short_lease = lease(rig, a, kind="text", price=quote)
    capped_job, capped_lease = lease(rig, b, kind="text", price=1)  # quoted below what the text would earn
    image_job, image_lease = lease(rig, b)
    short_text = "a short answer " * 10
    events = [(completion(short_job, short_lease, a, text=short_text), a),
              (completion(capped_job, capped_lease, b, text="x" * 2000), b),
              (completion(image_job, image_lease, b), b)]
    deliveries = [delivery(event, worker) for event, worker in events]

    await deliver_together(rig, deliveries)

    assert [d.settled for d in deliveries] == [["ack"]] * 3
    tokens = billed_tokens(text=short_text, max_length=TEXT_PARAMS["max_length"])
    expected = to_units(text_kudos(tokens=tokens, parameters_b=PARAMETERS_B,
                                   max_context_length=TEXT_PARAMS["max_context_length"]))
    short = job(rig, short_job)
    assert short.state == "done" and short.price == expected < quote
    assert Path(short.result_path).read_text() == short_text
    assert job(rig, capped_job).price == 1  # never above the quote
    assert job(rig, image_job).price == 1000  # an image job keeps its quote
    dones = {done.job_id: done for events in await announcements(rig) for done in events}
    assert dones.keys() == {short_job, capped_job, image_job}
    assert (dones[short_job].kind, dones[short_job].tokens) == ("text", tokens)
    assert dones[short_job].kudos == to_kudos(expected)
    assert dones[capped_job].tokens == TEXT_PARAMS["max_length"] and dones[capped_job].kudos == to_kudos(1)


async def test_a_database_error_nacks_the_whole_group_and_the_redelivery_completes_it(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = rig.workers["a"], rig.workers["b"]
    senders = [a, b] * 4
    events = [completion(*lease(rig, worker), worker) for worker in senders]
    real = job_store.complete_many

    async def down(*_: Any) -> Any:
        raise sa.exc.OperationalError("UPDATE jobs", {}, ConnectionResetError("connection lost"))

    monkeypatch.setattr(job_store, "complete_many", down)
    first = [delivery(event, worker) for event, worker in zip(events, senders, strict=True)]
    await deliver_together(rig, first)
    assert [d.settled for d in first] == [["nack(requeue=True)"]] * len(first)  # never lost
    assert all(job(rig, event.job_id).state == "claimed" for event in events)
    assert await announced(rig) == Counter()

    monkeypatch.setattr(job_store, "complete_many", real)
    redelivered = [delivery(event, worker) for event, worker in zip(events, senders, strict=True)]
    await deliver_together(rig, redelivered)
    assert [d.settled for d in redelivered] == [["ack"]] * len(redelivered)
    assert all(job(rig, event.job_id).state == "done" for event in events)
    assert await announced(rig) == Counter({event.job_id: 1 for event in events})  # never doubled


def batch(events: Sequence[JobCompleted], sender: WorkerRecord) -> Delivery:
    """``events`` in one ``jobs-completed.v1`` message, as ``sender`` publishes it."""
    message = JobsCompleted(completions=list(events))
    return Delivery(message.encode(), message.schema_name, sender.amqp_user, completed_key(sender.name))


async def test_one_message_of_several_completions_completes_each_and_is_acked_once(
        rig: Rig, group_sizes: list[int]) -> None:
    a, b = rig.workers["a"], rig.workers["b"]
    mine = [completion(*lease(rig, a), a) for _ in range(4)]
    stale_job, _ = lease(rig, a)
    with_stale = mine[:2] + [completion(stale_job, str(uuid.uuid4()), a)]  # not A's lease
    alone = completion(*lease(rig, b), b)
    deliveries = [batch(mine[2:], a), batch(with_stale, a), delivery(alone, b)]

    await deliver_together(rig, deliveries)

    assert [d.settled for d in deliveries] == [["ack"]] * 3  # one ack per message, the refused one's too
    assert sum(group_sizes) == 5  # the four of A and B's one, in a group (or two), never one each
    assert await announced(rig) == Counter({event.job_id: 1 for event in [*mine, alone]})
    for event in mine:
        row = job(rig, event.job_id)
        assert (row.state, row.worker_id, row.lease_id) == ("done", a.id, event.lease_id)
        assert Path(row.result_path).read_bytes() == event.image
    assert job(rig, stale_job).state == "claimed"
    assert [(o.kind, o.detail["job_id"]) for o in offences(rig, a)] == [("stale_completion", stale_job)]


async def test_several_completions_sent_in_another_workers_name_are_refused_as_one_forgery(rig: Rig) -> None:
    a, b = rig.workers["a"], rig.workers["b"]
    events = [completion(*lease(rig, a), a) for _ in range(3)]
    forged = batch(events, b)  # B's AMQP user and routing key, A's name in the body

    await deliver_together(rig, [forged])

    assert forged.settled == ["reject(requeue=False)"]
    assert all(job(rig, event.job_id).state == "claimed" for event in events)
    assert await announced(rig) == Counter()
    logged = offences(rig, b)  # the sender, found by its AMQP user, is struck
    assert [o.kind for o in logged] == ["forged_completion"] and strikes(rig, b) == 1  # one message, one offence
    assert logged[0].detail["job_id"] == events[0].job_id
    assert logged[0].detail["more_jobs"] == [e.job_id for e in events[1:]]


def test_the_completions_of_one_message_come_from_one_worker() -> None:
    a = completion("j1", "l1", WorkerRecord(id=1, name="a", owner_id=1, amqp_user="ua"))
    b = a.model_copy(update={"job_id": "j2", "worker": "b"})
    with pytest.raises(ValueError, match="one worker"):
        JobsCompleted(completions=[a, b])
    with pytest.raises(ValueError):
        JobsCompleted(completions=[])
