"""The broker watchdog end to end: vandal workers with RabbitMQ users of their own abuse their read
permission on a shared job queue while an honest `horde worker` (with its own user too) serves the
same model. Every job still completes, done and paid to the honest worker; the vandal is ejected
(connections closed, user deleted, login refused), suspended, flagged and logged within seconds.
An honest worker running jobs back to back is never ejected.

Real processes (`horde api` runs the watchdog), real RabbitMQ management statistics (refreshed
every 5 s on this broker), real PostgreSQL; the vandal is a pika client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa

from api.accounts import create_worker
from api.provisioning import BrokerAccounts, credentials_url, settings_grant
from api.tables import jobs, moderation_log, workers
from api.watchdog import Verdict, Watchdog, WorkerView
from broker.management import Management, vhost_of
from broker.topology import job_queue
from config import Settings
from config.database import make_async_engine
from tests.e2e import HordeClient, User
from tests.processes import Process, start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}
HONEST_MODELS = ["tiny-wd-prefetch", "tiny-wd-reject", "tiny-wd-purge", "tiny-wd-honest", "tiny-wd-hold"]
#: From the attack to the suspension: management statistics every 5 s, the watchdog every 2 s.
EJECTED_WITHIN = 15.0

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


def register(horde: HordeClient, settings: Settings, name: str, models: list[str]) -> Registered:
    """A worker row and its own RabbitMQ user with a worker's least privilege on the test vhost."""
    owner = horde.user(f"owner-{name}")
    grant = settings_grant(settings, name, models)
    CREATED_USERS.append(grant.user)
    password = management(settings, lambda m: BrokerAccounts(m, vhost_of(settings.rabbitmq_url)).provision(grant))
    with horde.engine.begin() as conn:
        record = create_worker(conn, name, owner=owner.account, amqp_user=grant.user)
        conn.execute(sa.update(workers).where(workers.c.id == record.id).values(models=models))
    return Registered(name, owner, record.id, grant.user, credentials_url(settings.rabbitmq_url, grant.user, password))


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
    """A worker client that does what read on a queue allows and no honest worker does."""

    def __init__(self, worker: Registered) -> None:
        self.worker = worker
        self.connection = pika.BlockingConnection(pika.URLParameters(worker.url))
        self.channel = self.connection.channel()
        self.received = 0
        self.closed_by_broker: str | None = None

    def hold(self, delivery_tag: int) -> None:
        self.received += 1

    def reject(self, delivery_tag: int) -> None:
        self.received += 1
        self.channel.basic_reject(delivery_tag, requeue=False)

    def consume(self, model: str, *, prefetch: int, exclusive: bool = False,
                settle: Callable[[int], None] | None = None) -> None:
        settle = settle or self.hold
        self.channel.basic_qos(prefetch_count=prefetch)
        self.channel.basic_consume(job_queue(model), lambda _ch, method, _p, _b: settle(method.delivery_tag),
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
    assert entry.detail["amqp_user"] == worker.amqp_user and any(r in logged for r in reasons for logged in entry.detail["reasons"])
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
    # its channel's counters (two listings, refreshed apart), by holding more than it has queues.
    ("tiny-wd-prefetch", 0, EJECTED_WITHIN,
     ("prefetch 0 on horde.jobs.tiny-wd-prefetch (unlimited)", "unacked deliveries, more than its 2 queues")),
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
        started = time.monotonic()
        vandal.consume(model, prefetch=prefetch)
        requests = [horde.submit(None, prompt=f"hoarded {i}", models=[model], params=TINY) for i in range(6)]
        closed = vandal.serve_until_closed(within + 10)
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert vandal.received > 0, "the vandal took jobs before it was ejected"
    assert_ejected(horde, settings, vandal, started, closed, reason, within=within)
    assert_all_done_by(horde, requests, worker, vandal.worker)
    assert_never_ejected(horde, worker)


def test_a_vandal_dropping_jobs_is_ejected_and_the_jobs_are_done(horde: HordeClient, settings: Settings,
                                                                 honest: tuple[Registered, Process]) -> None:
    """reject(requeue=False): the jobs are dead-lettered, and come back (dead-letter desk or
    reconciler); the drops are counted from the vandal channel's own statistics."""
    worker, _ = honest
    model = "tiny-wd-reject"
    vandal = Vandal(register(horde, settings, "wd-dropper", [model]))
    try:
        started = time.monotonic()
        vandal.consume(model, prefetch=1, settle=vandal.reject)
        requests = [horde.submit(None, prompt=f"dropped {i}", models=[model], params=TINY) for i in range(8)]
        closed = vandal.serve_until_closed(EJECTED_WITHIN + 25)
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert vandal.received > 0, "the vandal dropped jobs before it was ejected"
    assert_ejected(horde, settings, vandal, started, closed, "deliveries without acking them")
    assert_all_done_by(horde, requests, worker, vandal.worker)
    assert_never_ejected(horde, worker)


def test_a_vandal_locking_a_queue_is_ejected_and_the_queue_serves_again(horde: HordeClient, settings: Settings,
                                                                       models_dir: Path) -> None:
    """An exclusive consume locks every other consumer out (an honest worker could not even start);
    once the vandal is ejected, an honest worker takes the queue and does every job."""
    model = "tiny-wd-excl"
    vandal = Vandal(register(horde, settings, "wd-locker", [model]))
    requests = [horde.submit(None, prompt=f"locked {i}", models=[model], params=TINY) for i in range(3)]
    try:
        started = time.monotonic()
        vandal.consume(model, prefetch=1, exclusive=True)
        closed = vandal.serve_until_closed(EJECTED_WITHIN + 10)
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert_ejected(horde, settings, vandal, started, closed, f"exclusive consumer on {job_queue(model)}")
    worker = register(horde, settings, "wd-after-lock", [model])
    process = start_own_worker(settings, worker, [model], models_dir)
    try:
        assert_all_done_by(horde, requests, worker, vandal.worker)
    finally:
        process.stop()
        drop_user(settings, worker.amqp_user)
    assert_never_ejected(horde, worker)


def test_purged_jobs_all_complete(horde: HordeClient, settings: Settings,
                                  honest: tuple[Registered, Process]) -> None:
    """A purge is not attributable (RabbitMQ counts it nowhere per channel), but nothing is lost:
    the reconciler republishes the queued jobs missing from the queue."""
    worker, _ = honest
    model = "tiny-wd-purge"
    vandal = Vandal(register(horde, settings, "wd-purger", [model]))
    try:
        requests = [horde.submit(None, prompt=f"purged {i}", models=[model], params={**TINY, "steps": 30})
                    for i in range(8)]
        purged = vandal.channel.queue_purge(job_queue(model)).method.message_count
    finally:
        vandal.close()
        drop_user(settings, vandal.worker.amqp_user)
    assert purged > 0, "nothing was left in the queue to purge"
    assert_all_done_by(horde, requests, worker, vandal.worker)
    assert_never_ejected(horde, worker)


def test_an_honest_worker_running_jobs_back_to_back_is_never_ejected(
        horde: HordeClient, settings: Settings, honest: tuple[Registered, Process]) -> None:
    """Many jobs, one after another, with the look-ahead delivery held while each generates, then
    idle long enough for the watchdog to judge its quiet channel on exact figures."""
    worker, process = honest
    model = "tiny-wd-honest"
    requests = [horde.submit(None, prompt=f"honest {i}", models=[model], params={**TINY, "steps": 10 + 5 * (i % 4)})
                for i in range(16)]
    for request_id in requests:
        assert horde.wait_done(request_id, timeout=120)["done"]
    with horde.engine.connect() as conn:
        done_by = set(conn.execute(sa.select(jobs.c.worker_id).where(jobs.c.request_id.in_(requests))).scalars())
    assert done_by == {worker.worker_id}
    assert "claimed ahead" in process.log()
    time.sleep(3 * settings.watchdog_stats_seconds + 2 * settings.watchdog_interval_seconds + 2)
    assert process.alive() and "lost its connection" not in process.log()
    assert_never_ejected(horde, worker)
    wait_until(lambda: "broker watchdog watching" in api_log(settings), 5, "the watchdog to run")


def test_a_job_an_honest_worker_cannot_do_is_declined_put_back_and_done_by_another(
        horde: HordeClient, settings: Settings, models_dir: Path) -> None:
    """Too large for one worker: it declines (never nacks), the claims service puts the job back in
    the queue, the worker acks; another worker does it. Declining is never taken for dropping."""
    model = "tiny-wd-decline"
    picky = register(horde, settings, "wd-picky", [model])
    able = register(horde, settings, "wd-able", [model])
    config = settings.state_dir / "wd-picky.toml"
    config.write_text(f'name = "wd-picky"\namqp_url = "{picky.url}"\nmodels_dir = "{models_dir}"\n'
                      f'models = ["{model}"]\nmax_pixels = {64 * 64}\ndevice = "cpu"\n')
    picky_process = Process("worker-wd-picky", ["worker", "--config", str(config)], settings)
    able_process: Process | None = None
    try:
        picky_process.wait_for_log("consuming", timeout=90)
        request = horde.submit(None, prompt="too large", models=[model], params={**TINY, "width": 128, "height": 128})
        [job] = horde.job_rows(request)
        wait_until(lambda: picky_process.log().count(f"job={job.id} declined (declined; put back in the queue)") >= 2,
                   30, "the picky worker to decline the job twice", picky_process)
        assert f"job {job.id}: declined by wd-picky, put back in the queue of {model}" in api_log(settings)
        able_process = start_own_worker(settings, able, [model], models_dir)
        status = horde.wait_done(request, timeout=120)
        assert status["done"] and horde.job_rows(request)[0].worker_id == able.worker_id
        time.sleep(3 * settings.watchdog_stats_seconds + 2 * settings.watchdog_interval_seconds + 2)
        assert picky_process.alive() and "lost its connection" not in picky_process.log()
    finally:
        for process in (picky_process, able_process):
            if process is not None:
                process.stop()
        drop_user(settings, picky.amqp_user)
        drop_user(settings, able.amqp_user)
    assert "claim granted" not in picky_process.log()
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
