"""The broker watchdog end to end: vandal workers with RabbitMQ users of their own abuse their read
permission on the one queue a worker may read, its own (``horde.jobs.worker.<name>``), where the
horde puts copies of the jobs of users its owner serves first. An honest `horde worker` (with its
own user too) is handed the same jobs by the dispatcher from the models' queues, which no worker
reads (a purge of one is refused). Every job still completes, done and paid to the honest worker;
the vandal is ejected (connections closed, user deleted, login refused), suspended, flagged and
logged within seconds. An honest worker running jobs back to back is never ejected.

Real processes (`horde api` runs the dispatcher and the watchdog), real RabbitMQ management
statistics (refreshed every 5 s on this broker), real PostgreSQL; the vandal is a pika client,
and the copies in its queue are published as the horde's trusted user, as the API does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from pika.adapters.blocking_connection import BlockingChannel

from api.accounts import create_worker
from api.jobs import job_message
from api.provisioning import BrokerAccounts, credentials_url, settings_grant, worker_queue_topology
from api.tables import jobs, moderation_log, workers
from api.watchdog import Verdict, Watchdog, WorkerView
from broker.amqp import declare_sync
from broker.management import Management, vhost_of
from broker.messages import JobMessage
from broker.topology import JOBS_EXCHANGE, job_queue, worker_queue, worker_routing_key
from config import Settings
from config.database import make_async_engine
from tests.e2e import HordeClient, User
from tests.processes import Process, start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}
HONEST_MODELS = ["tiny-wd-prefetch", "tiny-wd-reject", "tiny-wd-purge", "tiny-wd-honest", "tiny-wd-hold"]
#: From the attack to the suspension: management statistics every 5 s, the watchdog every 2 s.
EJECTED_WITHIN = 15.0
#: AMQP reply code of a refused operation (here: a worker purging a queue it may not read).
ACCESS_REFUSED = 403

T = TypeVar("T")


def management(settings: Settings, call: Callable[[Management], Awaitable[T]]) -> T:
    async def go() -> T:
        client = Management(settings.rabbitmq_management_url)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


@dataclass(frozen=True)
class Registered:
    name: str
    owner: User
    worker_id: int
    amqp_user: str
    url: str  # the AMQP URL with its own credentials


#: Every RabbitMQ user these tests created (users are broker-wide): deleted again at the end.
CREATED_USERS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def delete_created_users(settings: Settings) -> Iterator[None]:
    yield
    for user in CREATED_USERS:
        drop_user(settings, user)


@contextmanager
def horde_channel(settings: Settings) -> Iterator[BlockingChannel]:
    """A confirming channel of the horde's trusted user: what the API itself may do on the broker."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        connection.close()


def register(horde: HordeClient, settings: Settings, name: str, models: list[str]) -> Registered:
    """A worker row, its own RabbitMQ user with a worker's least privilege on the test vhost, and
    its own queue (declared by the horde, as registration does: the worker may declare nothing)."""
    owner = horde.user(f"owner-{name}")
    grant = settings_grant(settings, name)
    CREATED_USERS.append(grant.user)
    password = management(settings, lambda m: BrokerAccounts(m, vhost_of(settings.rabbitmq_url)).provision(grant))
    with horde_channel(settings) as channel:
        declare_sync(channel, worker_queue_topology(name))
    with horde.engine.begin() as conn:
        record = create_worker(conn, name, owner=owner.account, amqp_user=grant.user)
        conn.execute(sa.update(workers).where(workers.c.id == record.id).values(models=models))
    return Registered(name, owner, record.id, grant.user, credentials_url(settings.rabbitmq_url, grant.user, password))


def copy_to_own_queue(horde: HordeClient, settings: Settings, worker: Registered, request_ids: list[str]) -> None:
    """Put a copy of each job in the worker's own queue, as the horde does for the users its owner
    serves first; the originals stay in the models' queues, for the dispatcher to hand out."""
    with horde_channel(settings) as channel:
        for request_id in request_ids:
            row = horde.job_rows(request_id)[0]
            channel.basic_publish(
                JOBS_EXCHANGE, worker_routing_key(worker.name), job_message(row).encode(),
                pika.BasicProperties(type=JobMessage.schema_name, message_id=row.id, delivery_mode=2,
                                     priority=row.tier, content_type="application/json"),
                mandatory=True)  # confirmed and routed: the queue holds it when this returns


def drop_user(settings: Settings, user: str) -> None:
    management(settings, lambda m: m.delete_user(user))


def worker_row(horde: HordeClient, worker_id: int) -> Any:
    with horde.engine.connect() as conn:
        return conn.execute(sa.select(workers).where(workers.c.id == worker_id)).one()


def watchdog_log(horde: HordeClient, worker_id: int) -> list[Any]:
    with horde.engine.connect() as conn:
        return list(conn.execute(sa.select(moderation_log).where(
            moderation_log.c.worker_id == worker_id, moderation_log.c.kind == "watchdog")))


def api_log(settings: Settings) -> str:
    return (settings.state_dir / "logs" / "api.log").read_text(errors="replace")


def start_own_worker(settings: Settings, worker: Registered, models: list[str], models_dir: Path) -> Process:
    """`horde worker` logging in as the worker's own RabbitMQ user."""
    return start_worker(settings.model_copy(update={"rabbitmq_url": worker.url}), worker.name, models, models_dir)


@pytest.fixture(scope="module")
def honest(horde: HordeClient, settings: Settings, models_dir: Path) -> Iterator[tuple[Registered, Process]]:
    """The honest worker, with a user of its own (so the watchdog judges it too), serving the
    models of the tests below."""
    worker = register(horde, settings, "wd-honest", HONEST_MODELS)
    process = start_own_worker(settings, worker, HONEST_MODELS, models_dir)
    yield worker, process
    process.stop()
    drop_user(settings, worker.amqp_user)


class Vandal:
    """A worker client that does what read on its own queue allows and no honest worker does."""

    def __init__(self, worker: Registered) -> None:
        self.worker = worker
        self.queue = worker_queue(worker.name)
        self.connection = pika.BlockingConnection(pika.URLParameters(worker.url))
        self.channel = self.connection.channel()
        self.received = 0
        self.closed_by_broker: str | None = None

    def hold(self, delivery_tag: int) -> None:
        self.received += 1

    def reject(self, delivery_tag: int) -> None:
        self.received += 1
        self.channel.basic_reject(delivery_tag, requeue=False)

    def consume(self, *, prefetch: int, exclusive: bool = False, settle: Callable[[int], None] | None = None) -> None:
        settle = settle or self.hold
        self.channel.basic_qos(prefetch_count=prefetch)
        self.channel.basic_consume(self.queue, lambda _ch, method, _p, _b: settle(method.delivery_tag),
                                   exclusive=exclusive)

    def serve_until_closed(self, timeout: float) -> float:
        """Run the client until the broker closes it; returns when that happened (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.connection.process_data_events(0.2)
            except (pika.exceptions.ConnectionClosedByBroker, pika.exceptions.StreamLostError,
                    pika.exceptions.ChannelClosedByBroker) as exc:
                self.closed_by_broker = str(exc)
                return time.monotonic()
        raise AssertionError(f"the vandal {self.worker.name} was not disconnected within {timeout}s")

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def assert_ejected(horde: HordeClient, settings: Settings, vandal: Vandal, started: float, closed: float,
                   reason: str | tuple[str, ...], *, within: float = EJECTED_WITHIN) -> None:
    """Disconnected, suspended, flagged, struck, logged, locked out: within seconds. ``reason``:
    the evidence expected, or the alternatives when several rules see the same vandal first."""
    worker = vandal.worker
    reasons = (reason,) if isinstance(reason, str) else reason
    assert closed - started < within, f"ejected after {closed - started:.1f}s"
    row = worker_row(horde, worker.worker_id)
    assert row.suspended_at is not None and row.flagged and row.strikes == 1
    assert any(r in row.suspension_reason for r in reasons), row.suspension_reason
    [entry] = watchdog_log(horde, worker.worker_id)
    assert entry.user_id == worker.owner.id
    assert entry.detail["amqp_user"] == worker.amqp_user
    assert any(r in logged for r in reasons for logged in entry.detail["reasons"]), entry.detail["reasons"]
    assert entry.detail["channels"], "the evidence names its channels"
    assert f"watchdog ejected worker {worker.name} (AMQP user {worker.amqp_user})" in api_log(settings)
    assert management(settings, lambda m: m.user_exists(worker.amqp_user)) is False
    with pytest.raises(pika.exceptions.AMQPConnectionError):  # it cannot come back
        pika.BlockingConnection(pika.URLParameters(worker.url))


def assert_all_done_by(horde: HordeClient, request_ids: list[str], worker: Registered, vandal: Registered) -> None:
    for request_id in request_ids:
        status = horde.wait_done(request_id, timeout=120)
        assert status["done"] and not status["faulted"], status
        [job] = horde.job_rows(request_id)
        assert job.state == "done" and job.worker_id == worker.worker_id
    assert horde.balance(vandal.owner) == 0  # earned nothing


def assert_never_ejected(horde: HordeClient, worker: Registered) -> None:
    row = worker_row(horde, worker.worker_id)
    assert row.suspended_at is None and not row.flagged and row.strikes == 0
    assert watchdog_log(horde, worker.worker_id) == []


@pytest.mark.parametrize(("model", "prefetch", "within", "reason"), [
    # A hoarder is caught by its prefetch, or, when the management API lists its consumer only after
    # its channel's counters (two listings, refreshed apart), by holding more than its one queue.
    ("tiny-wd-prefetch", 0, EJECTED_WITHIN,
     (f"prefetch 0 on {worker_queue('wd-hoarder-0')} (unlimited)", "unacked deliveries, more than its 1 queues")),
    # Prefetch 1, but it never acks: held past the lease (10 s in the tests) with no lease of its own.
    ("tiny-wd-hold", 1, 10.0 + EJECTED_WITHIN, "deliveries unacked for"),
])
def test_a_hoarding_vandal_is_ejected_and_its_jobs_are_done(horde: HordeClient, settings: Settings,
                                                            honest: tuple[Registered, Process], model: str,
                                                            prefetch: int, within: float,
                                                            reason: str | tuple[str, ...]) -> None:
    worker, _ = honest
    vandal = Vandal(register(horde, settings, f"wd-hoarder-{prefetch}", [model]))
    try:
        requests = [horde.submit(None, prompt=f"hoarded {i}", models=[model], params=TINY) for i in range(6)]
        copy_to_own_queue(horde, settings, vandal.worker, requests)
        started = time.monotonic()
        vandal.consume(prefetch=prefetch)
        closed = vandal.serve_until_closed(within + 10)
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert vandal.received == (6 if prefetch == 0 else 1), "the vandal took its copies before it was ejected"
    assert_ejected(horde, settings, vandal, started, closed, reason, within=within)
    assert_all_done_by(horde, requests, worker, vandal.worker)
    assert_never_ejected(horde, worker)


def test_a_vandal_dropping_jobs_is_ejected_and_the_jobs_are_done(horde: HordeClient, settings: Settings,
                                                                 honest: tuple[Registered, Process]) -> None:
    """reject(requeue=False) of the copies in its queue: they are dead-lettered (the originals are
    still in the model's queue); the drops are counted from the vandal channel's own statistics."""
    worker, _ = honest
    model = "tiny-wd-reject"
    vandal = Vandal(register(horde, settings, "wd-dropper", [model]))
    try:
        requests = [horde.submit(None, prompt=f"dropped {i}", models=[model], params=TINY) for i in range(8)]
        copy_to_own_queue(horde, settings, vandal.worker, requests)
        started = time.monotonic()
        vandal.consume(prefetch=1, settle=vandal.reject)
        closed = vandal.serve_until_closed(EJECTED_WITHIN + 25)
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert vandal.received > 0, "the vandal dropped jobs before it was ejected"
    assert_ejected(horde, settings, vandal, started, closed, "deliveries without acking them")
    assert_all_done_by(horde, requests, worker, vandal.worker)
    assert_never_ejected(horde, worker)


def test_a_vandal_locking_its_queue_is_ejected_and_the_jobs_are_done(horde: HordeClient, settings: Settings,
                                                                    models_dir: Path) -> None:
    """An exclusive consume of its own queue: nothing an honest worker does (it would lock out the
    horde's own tools); ejected. Its copies were only copies: a worker started after does every job
    from the model's queue."""
    model = "tiny-wd-excl"
    vandal = Vandal(register(horde, settings, "wd-locker", [model]))
    requests = [horde.submit(None, prompt=f"locked {i}", models=[model], params=TINY) for i in range(3)]
    try:
        copy_to_own_queue(horde, settings, vandal.worker, requests)
        started = time.monotonic()
        vandal.consume(prefetch=1, exclusive=True)
        closed = vandal.serve_until_closed(EJECTED_WITHIN + 10)
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert_ejected(horde, settings, vandal, started, closed, f"exclusive consumer on {vandal.queue}")
    worker = register(horde, settings, "wd-after-lock", [model])
    process = start_own_worker(settings, worker, [model], models_dir)
    try:
        assert_all_done_by(horde, requests, worker, vandal.worker)
    finally:
        process.stop()
        drop_user(settings, worker.amqp_user)
    assert_never_ejected(horde, worker)


def test_a_vandal_may_not_purge_a_shared_queue_and_purging_its_own_loses_nothing(
        horde: HordeClient, settings: Settings, honest: tuple[Registered, Process]) -> None:
    """A purge is not attributable (RabbitMQ counts it nowhere per channel), so a worker may not
    read, hence purge, a model's queue: the broker refuses it. Its own queue it may purge, but that
    holds only copies: the honest worker is handed every job from the model's queue."""
    worker, _ = honest
    model = "tiny-wd-purge"
    vandal = Vandal(register(horde, settings, "wd-purger", [model]))
    try:
        requests = [horde.submit(None, prompt=f"purged {i}", models=[model], params={**TINY, "steps": 30})
                    for i in range(8)]
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            vandal.channel.queue_purge(job_queue(model))
        assert refused.value.reply_code == ACCESS_REFUSED and "ACCESS_REFUSED" in refused.value.reply_text
        copy_to_own_queue(horde, settings, vandal.worker, requests)
        purged = vandal.connection.channel().queue_purge(vandal.queue).method.message_count
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert purged == len(requests), "the copies were in the vandal's queue to purge"
    assert_all_done_by(horde, requests, worker, vandal.worker)
    assert_never_ejected(horde, worker)


def test_an_honest_worker_running_jobs_back_to_back_is_never_ejected(
        horde: HordeClient, settings: Settings, honest: tuple[Registered, Process]) -> None:
    """Many jobs, one after another, each next one asked for (and leased) while the previous one
    generates, then idle long enough for the watchdog to judge its quiet channel on exact figures."""
    worker, process = honest
    model = "tiny-wd-honest"
    requests = [horde.submit(None, prompt=f"honest {i}", models=[model], params={**TINY, "steps": 10 + 5 * (i % 4)})
                for i in range(16)]
    for request_id in requests:
        assert horde.wait_done(request_id, timeout=120)["done"]
    with horde.engine.connect() as conn:
        done = list(conn.execute(sa.select(jobs.c.id, jobs.c.worker_id).where(jobs.c.request_id.in_(requests))))
    assert {job.worker_id for job in done} == {worker.worker_id}
    # Asked for while the previous job generated: a look-ahead job under a lease of its own.
    ahead = [job.id for job in done if f"job={job.id} offered ahead" in process.log()]
    assert ahead, "no job of this test was offered ahead"
    time.sleep(3 * settings.watchdog_stats_seconds + 2 * settings.watchdog_interval_seconds + 2)
    assert process.alive() and "lost its connection" not in process.log()
    assert_never_ejected(horde, worker)
    wait_until(lambda: "broker watchdog watching" in api_log(settings), 5, "the watchdog to run")


def test_a_job_an_honest_worker_cannot_do_is_never_offered_to_it_and_done_by_another(
        horde: HordeClient, settings: Settings, models_dir: Path) -> None:
    """Too large for one worker (its asks say max_pixels 64x64): the dispatcher never offers it the
    job, which waits for a worker able to do it; neither worker is taken for a vandal."""
    model = "tiny-wd-decline"
    picky = register(horde, settings, "wd-picky", [model])
    able = register(horde, settings, "wd-able", [model])
    config = settings.state_dir / "wd-picky.toml"
    config.write_text(f'name = "wd-picky"\namqp_url = "{picky.url}"\nmodels_dir = "{models_dir}"\n'
                      f'models = ["{model}"]\nmax_pixels = {64 * 64}\ndevice = "cpu"\n')
    picky_process = Process("worker-wd-picky", ["worker", "--config", str(config)], settings)
    able_process: Process | None = None
    try:
        picky_process.wait_for_log("asking for jobs", timeout=90)
        request = horde.submit(None, prompt="too large", models=[model], params={**TINY, "width": 128, "height": 128})
        [job] = horde.job_rows(request)
        # The dispatcher matches a job the moment it holds it against the asks waiting: an offer
        # to the picky worker would have come within this.
        time.sleep(3)
        assert horde.job_rows(request)[0].state == "queued", "nobody could take it yet"
        able_process = start_own_worker(settings, able, [model], models_dir)
        status = horde.wait_done(request, timeout=120)
        assert status["done"] and horde.job_rows(request)[0].worker_id == able.worker_id
        assert f"job={job.id} offered" in able_process.log()
        time.sleep(3 * settings.watchdog_stats_seconds + 2 * settings.watchdog_interval_seconds + 2)
        assert picky_process.alive() and "lost its connection" not in picky_process.log()
    finally:
        for process in (picky_process, able_process):
            if process is not None:
                process.stop()
        drop_user(settings, picky.amqp_user)
        drop_user(settings, able.amqp_user)
    assert f"job={job.id}" not in picky_process.log(), "the picky worker was never offered (nor sent) the job"
    assert_never_ejected(horde, picky)
    assert_never_ejected(horde, able)


def test_ejection_is_recorded_once_when_several_api_processes_judge_the_same_vandal(
        horde: HordeClient, settings: Settings) -> None:
    """Two watchdogs (two API processes) eject the same worker at once: one suspension, one strike,
    one moderation log entry; the RabbitMQ user is gone either way."""
    vandal = register(horde, settings, "wd-twice", ["tiny-wd-hold"])
    engine = make_async_engine(settings.resolved_database_url)
    verdict = Verdict(WorkerView(vandal.worker_id, vandal.name, vandal.owner.id, vandal.amqp_user),
                      ("exclusive consumer on horde.jobs.tiny-wd-hold",), {"channels": []})

    async def eject_twice() -> list[bool]:
        dogs = [Watchdog.from_settings(settings, engine) for _ in range(2)]
        try:
            return list(await asyncio.gather(*(dog.eject(verdict) for dog in dogs)))
        finally:
            for dog in dogs:
                await dog.aclose()
            await engine.dispose()

    try:
        assert sorted(asyncio.run(eject_twice())) == [False, True]
    finally:
        drop_user(settings, vandal.amqp_user)
    row = worker_row(horde, vandal.worker_id)
    assert row.suspended_at is not None and row.flagged and row.strikes == 1
    assert len(watchdog_log(horde, vandal.worker_id)) == 1
    assert management(settings, lambda m: m.user_exists(vandal.amqp_user)) is False
