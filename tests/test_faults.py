"""Nothing is lost when parts die: real processes SIGKILLed, SIGSTOPped, brokers and databases restarted.

The first tests use the session's horde (shared RabbitMQ and PostgreSQL, own models). Those that
restart RabbitMQ or PostgreSQL, or must own the only ledger, run a horde of their own on private
instances (``tests.isolated``): the shared services are never touched.

Every test ends with the same checks: each job settled exactly once (four ``job:<id>:*``
entries), the kudos where the finishing worker's owner gets them, and ``reconcile`` clean.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
import sqlalchemy as sa

import migrations
from api.tables import jobs, workers
from broker.messages import JobDone, JobFaulted
from broker.topology import (
    ASKS_QUEUE,
    CLAIMS_QUEUE, DEAD_QUEUE, EVENTS_EXCHANGE, HEARTBEATS_QUEUE, JOB_DONE_KEY, LEDGER_QUEUE, RESULTS_QUEUE, faulted_key,
)
from config import Settings
from ledger.pricing import horde_tax
from ledger.report import reconcile
from ledger.tables import entries
from tests.e2e import HordeClient, User
from tests.isolated import PrivatePostgres, PrivateRabbit, private_root
from tests.processes import Process, free_port, start_api, start_ledger, start_worker, wait_until
from tests.manual_worker import ManualWorker

TINY = {"width": 64, "height": 64, "steps": 4}
#: Long enough that a worker is still generating when it is killed or stopped.
SLOW = {"width": 64, "height": 64, "steps": 300}


# --- checks --------------------------------------------------------------------------------------


def unsettled(client: HordeClient, job_ids: list[str]) -> set[str]:
    with client.engine.connect() as conn:
        settled = conn.execute(sa.select(entries.c.job_id).where(entries.c.job_id.in_(job_ids)).distinct()).scalars()
        return set(job_ids) - set(settled)


def settled_once(client: HordeClient, job_ids: list[str]) -> None:
    """Each job has exactly its four entries (debit, credit, tax pair), each key once."""
    with client.engine.connect() as conn:
        rows = conn.execute(sa.select(entries.c.job_id, entries.c.key).where(entries.c.job_id.in_(job_ids))).all()
    keys: dict[str, list[str]] = {}
    for job_id, key in rows:
        assert key.startswith(f"job:{job_id}:"), key
        keys.setdefault(job_id, []).append(key)
    assert set(keys) == set(job_ids), f"unsettled: {set(job_ids) - set(keys)}"
    bad = {j: k for j, k in keys.items() if len(k) != 4 or len(set(k)) != 4}
    assert not bad, bad


def books_balance(client: HordeClient) -> None:
    with client.engine.connect() as conn:
        assert reconcile(conn) == []


def worker_ids(client: HordeClient) -> dict[str, int]:
    with client.engine.connect() as conn:
        return {row.name: row.id for row in conn.execute(sa.select(workers.c.name, workers.c.id))}


def claimed_by(client: HordeClient, worker_id: int) -> list[str]:
    with client.engine.connect() as conn:
        return list(conn.execute(sa.select(jobs.c.id).where(jobs.c.worker_id == worker_id, jobs.c.state == "claimed"))
                    .scalars())


def horde_log(settings: Settings, name: str) -> str:
    return (settings.state_dir / "logs" / f"{name}.log").read_text(errors="replace")


def kill_mid_job(client: HordeClient, worker: Process, worker_id: int) -> str:
    """SIGKILL ``worker`` once it holds a claimed job; returns that job's id."""
    [job_id, *_] = wait_until(lambda: claimed_by(client, worker_id), 60, f"{worker.name} to claim a job", worker)
    time.sleep(0.3)  # into the generation
    worker.kill()
    return job_id


# --- workers dying and hanging (the session's horde) -----------------------------------------------


def test_workers_killed_again_and_again_lose_nothing_and_only_finishers_are_paid(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    requester = horde.user("kills-requester", kudos=1000)
    owners = {name: horde.user(f"owner-{name}") for name in ("w-kill-a", "w-kill-b", "w-kill-c")}
    for name, owner in owners.items():
        horde.register_worker(name, owner)
    ids = worker_ids(horde)
    request_ids = [horde.submit(requester, prompt=f"kill {i}", models=["tiny-kills"], params=SLOW) for i in range(5)]
    killed: list[str] = []
    # a dies mid-job, comes back and dies again mid-job; b dies once; c finishes what is left.
    for name in ("w-kill-a", "w-kill-b", "w-kill-a"):
        worker = start_worker(settings, name, ["tiny-kills"], models_dir)
        killed.append(kill_mid_job(horde, worker, ids[name]))
    survivor = start_worker(settings, "w-kill-c", ["tiny-kills"], models_dir)
    try:
        statuses = [horde.wait_done(r, timeout=150) for r in request_ids]
    finally:
        survivor.stop()
    assert all(s["done"] and not s["faulted"] for s in statuses)
    rows = [row for r in request_ids for row in horde.job_rows(r)]
    assert all(row.state == "done" for row in rows)
    settled_once(horde, [row.id for row in rows])
    # Whoever finished a job, and only they, earned its price: a killed job went to someone else.
    by_id = {i: name for name, i in ids.items()}
    earned = {name: 0 for name in owners}
    for row in rows:
        earned[by_id[row.worker_id]] += row.price
    for job_id in killed:  # each killed job's lease was taken back (attempts counts releases) and redone
        [row] = [r for r in rows if r.id == job_id]
        assert row.attempts >= 1, row
    for name, owner in owners.items():
        horde.wait_balance(owner, earned[name] / 100)
    total = sum(row.price for row in rows) / 100
    assert horde.balance(requester) == pytest.approx(1000 - total - sum(horde_tax(r.price / 100) for r in rows))
    books_balance(horde)


def test_a_hung_worker_loses_its_job_to_another_and_is_not_paid(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    requester = horde.user("hung-requester", kudos=100)
    hung_owner, rescuer_owner = horde.user("owner-hung"), horde.user("owner-rescuer")
    horde.register_worker("w-hung", hung_owner)
    horde.register_worker("w-rescuer", rescuer_owner)
    ids = worker_ids(horde)
    hung = start_worker(settings, "w-hung", ["tiny-hung"], models_dir)
    rescuer = None
    try:
        request_id = horde.submit(requester, prompt="never finished", models=["tiny-hung"], params=SLOW)
        [job_id] = wait_until(lambda: claimed_by(horde, ids["w-hung"]), 60, "the hung worker to claim", hung)
        hung.popen.send_signal(signal.SIGSTOP)  # alive, holding its lease and its connection, doing nothing
        rescuer = start_worker(settings, "w-rescuer", ["tiny-hung"], models_dir)
        status = horde.wait_done(request_id, timeout=90)
        assert status["generations"][0]["worker_name"] == "w-rescuer"
        # Woken up, the hung worker finishes and sends its result: too late, the job went to another.
        hung.popen.send_signal(signal.SIGCONT)
        ignored = f"job {job_id}: result from w-hung ignored: late: its lease expired and the job went to another"
        wait_until(lambda: ignored in horde_log(settings, "api"), 90, "the late result to be refused")
    finally:
        hung.popen.send_signal(signal.SIGCONT)
        hung.stop()
        if rescuer is not None:
            rescuer.stop()
    [row] = horde.job_rows(request_id)
    assert row.state == "done" and row.worker_id == ids["w-rescuer"]
    horde.wait_balance(rescuer_owner, row.price / 100)
    assert horde.balance(hung_owner) == 0
    settled_once(horde, [row.id])
    with horde.engine.connect() as conn:  # slow, not dishonest: no strike
        assert conn.execute(sa.select(workers.c.strikes).where(workers.c.id == ids["w-hung"])).scalar_one() == 0


def test_a_job_that_faults_max_attempts_times_is_faulted_and_not_charged(
        horde: HordeClient, settings: Settings) -> None:
    requester, owner = horde.user("faulty-requester", kudos=50), horde.user("owner-faulty")
    horde.register_worker("w-faulty", owner)
    request_id = horde.submit(requester, prompt="cursed", models=["tiny-faulty"], params=TINY)
    [job] = horde.job_rows(request_id)
    worker = ManualWorker(settings.rabbitmq_url, "w-faulty")
    try:
        for attempt in range(settings.max_attempts):
            wait_until(lambda: horde.job_rows(request_id)[0].state == "queued", 20, f"the job queued ({attempt})")
            offer = worker.take("tiny-faulty", job.id)
            assert offer.lease_id is not None
            event = JobFaulted(job_id=job.id, lease_id=offer.lease_id, worker="w-faulty", reason=f"boom {attempt}")
            worker.publish(faulted_key("w-faulty"), event)
        wait_until(lambda: horde.job_rows(request_id)[0].state == "faulted", 20, "the job to be faulted")
        denied = worker.claim(job.id, "tiny-faulty")
        assert denied is not None and not denied.granted
    finally:
        worker.close()
    status = horde.http.get(f"/api/v2/generate/status/{request_id}").json()
    assert status["faulted"] and not status["done"]
    time.sleep(1.0)  # anything wrongly published would reach the ledger by now
    assert horde.ledger_entries(job.id) == []
    assert horde.balance(requester) == 50 and horde.balance(owner) == 0


# --- a horde of its own, on private RabbitMQ and PostgreSQL ---------------------------------------------


@dataclass
class PrivateHorde:
    rabbit: PrivateRabbit
    postgres: PrivatePostgres
    settings: Settings
    client: HordeClient
    api: Process
    ledger: Process
    started: list[Process] = field(default_factory=list)

    def worker(self, name: str, owner: User, models_dir: Path) -> Process:
        self.client.register_worker(name, owner)
        worker = start_worker(self.settings, name, ["tiny-e2e"], models_dir)
        self.started.append(worker)
        return worker


@pytest.fixture(scope="module")
def private(model_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateHorde]:
    began = time.monotonic()
    rabbit, postgres = PrivateRabbit(private_root("horde-rabbit-")), PrivatePostgres(private_root("horde-pg-"))
    state = tmp_path_factory.mktemp("private-state")  # kept by pytest: the processes' logs are there
    try:
        rabbit.start()
        postgres.start()
        url = postgres.create_database()
        migrations.upgrade(url)
        settings = Settings(
            database_url=url, rabbitmq_url=rabbit.url, rabbitmq_management_url=rabbit.management_url,
            state_dir=state, model_reference=model_reference, api_port=free_port(), lease_base_seconds=2.0,
            lease_step_seconds=0.02, lease_min_seconds=10.0, max_attempts=5, reconcile_interval_seconds=0.5,
            republish_after_seconds=3.0, aging_seconds=0.0, claim_timeout_seconds=5.0, worker_user_prefix="pf-",
            ask_refresh_seconds=2.0,
            # The load here is the test's own: request rate limits would only get in the way.
            submit_rate_per_key=0, submit_rate_per_ip=0, poll_rate_per_ip=0,
        )
        api = start_api(settings)
        ledger = start_ledger(settings)
        horde = PrivateHorde(rabbit, postgres, settings, HordeClient(settings), api, ledger)
        print(f"private horde up in {time.monotonic() - began:.1f}s (RabbitMQ {rabbit.start_seconds:.1f}s, "
              f"PostgreSQL {postgres.start_seconds:.1f}s)")
        yield horde
        for process in (*horde.started, horde.ledger, horde.api):
            if process.alive():
                process.popen.send_signal(signal.SIGCONT)
            process.stop()
        horde.client.close()
    finally:
        rabbit.stop()
        postgres.stop()
        for root in (rabbit.root, postgres.root):
            shutil.rmtree(root, ignore_errors=True)


def publish_done_events(settings: Settings, events: list[tuple[str, JobDone]]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for message_id, event in events:
            channel.basic_publish(EVENTS_EXCHANGE, JOB_DONE_KEY, event.encode(), pika.BasicProperties(
                message_id=message_id, type=event.schema_name, user_id="guest", delivery_mode=2), mandatory=True)
    finally:
        connection.close()


def count_settled(client: HordeClient, prefix: str) -> int:
    with client.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count(sa.distinct(entries.c.job_id)))
                            .where(entries.c.job_id.like(prefix + "%"))).scalar_one()


def test_the_ledger_killed_during_a_burst_settles_each_job_once(private: PrivateHorde) -> None:
    client, settings = private.client, private.settings
    jobs_total, kudos = 3000, 1.0
    requester, owner = client.user("burst-requester", kudos=jobs_total * 2), client.user("burst-owner")
    client.register_worker("w-burst", owner)
    worker_id = worker_ids(client)["w-burst"]
    prefix = uuid.uuid4().hex[:8]
    now = datetime.now(timezone.utc)
    events = [(f"job-done:{prefix}-{i}", JobDone(
        job_id=f"{prefix}-{i}", request_id=f"{prefix}-r{i}", requester_id=requester.id, worker_id=worker_id,
        worker_owner_id=owner.id, worker_name="w-burst", model="tiny-e2e", kind="image", kudos=kudos,
        megapixelsteps=0.1, finished_at=now)) for i in range(jobs_total)]
    # Redeliveries with the same id and re-announcements under a new id: both must change nothing.
    events += events[:300] + [(f"again-{m}", e) for m, e in events[300:600]]
    private.ledger.stop()
    publish_done_events(settings, events)
    for _ in range(2):  # killed twice, each time part-way through
        ledger = start_ledger(settings)
        before = count_settled(client, prefix)
        wait_until(lambda: count_settled(client, prefix) > before, 60, "the ledger to settle something", ledger)
        ledger.kill()
        assert count_settled(client, prefix) < jobs_total, "the burst was settled before the kill: make it bigger"
    private.ledger = start_ledger(settings)
    wait_until(lambda: count_settled(client, prefix) == jobs_total, 120, "every job settled", private.ledger)
    wait_until(lambda: private_queue_depth(settings, LEDGER_QUEUE) == 0, 60, "the ledger queue drained")
    time.sleep(0.5)
    settled_once(client, [e.job_id for _, e in events[:jobs_total]])
    client.wait_balance(owner, jobs_total * kudos)
    assert client.balance(requester) == pytest.approx(jobs_total * 2 - jobs_total * (kudos + horde_tax(kudos)))
    books_balance(client)


def private_queue_depth(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


class Load:
    """Submits a job every ``pause`` seconds from a thread, recording every answer."""

    def __init__(self, client: HordeClient, user: User, pause: float = 0.2) -> None:
        self._http = httpx.Client(base_url=str(client.http.base_url), timeout=60)
        self._user, self._pause = user, pause
        self.accepted: list[str] = []
        self.refused: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(90)
        self._http.close()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                response = self._http.post("/api/v2/generate/async", headers={"apikey": self._user.apikey},
                                           json={"prompt": f"load {i}", "models": ["tiny-e2e"], "params": TINY})
            except httpx.HTTPError as exc:
                self.refused.append((0, {"error": repr(exc)}))
            else:
                if response.status_code == 202:
                    self.accepted.append(response.json()["id"])
                else:
                    self.refused.append((response.status_code, response.json()))
            self._stop.wait(self._pause)

    def accepted_after(self, count: int, more: int, timeout: float) -> None:
        wait_until(lambda: len(self.accepted) >= count + more, timeout, f"{more} submissions accepted again")


def wait_done_through_outages(client: HordeClient, request_id: str, timeout: float = 120) -> dict[str, Any]:
    """Like HordeClient.wait_done, but a 503 (the service still recovering) is only a reason to ask again."""
    def status() -> dict[str, Any] | None:
        response = client.http.get(f"/api/v2/generate/status/{request_id}")
        assert response.status_code in (200, 503), response.text
        body = response.json()
        return body if response.status_code == 200 and (body["done"] or body["faulted"]) else None
    return wait_until(status, timeout, f"request {request_id} done")  # type: ignore[return-value]


def ride_out(private: PrivateHorde, models_dir: Path, restart: Any, rc: str, tag: str) -> None:
    """Keep submitting while ``restart()`` takes a service down and up; check nothing accepted is lost."""
    client = private.client
    requester, owner = client.user(f"{tag}-requester", kudos=5000), client.user(f"{tag}-owner")
    worker = private.worker(f"w-{tag}", owner, models_dir)
    try:
        with Load(client, requester) as load:
            load.accepted_after(0, 5, 60)
            restart()
            during = len(load.accepted)
            load.accepted_after(during, 5, 90)  # the API recovered by itself
        assert load.refused, "the API never noticed the outage"
        for status, body in load.refused:
            assert status == 503 and body.get("rc") == rc and body.get("message"), (status, body)
        # Jobs accepted after the outage are done too: API, ledger and worker reconnected by themselves.
        statuses = [wait_done_through_outages(client, r) for r in load.accepted]
        assert all(s["done"] and s["finished"] == 1 for s in statuses)
        assert private.api.alive() and private.ledger.alive() and worker.alive()
    finally:
        worker.stop()
        private.started.remove(worker)
    rows = [row for r in load.accepted for row in client.job_rows(r)]
    assert {row.worker_id for row in rows} == {worker_ids(client)[f"w-{tag}"]}
    # A job is done before the ledger settles it, and after an outage the ledger reconnects on its
    # own back-off (up to 30 s): wait for every settlement, then check that each came once.
    job_ids = [row.id for row in rows]
    wait_until(lambda: not unsettled(client, job_ids), 90, "the ledger to settle every done job", private.ledger)
    settled_once(client, job_ids)
    client.wait_balance(owner, sum(row.price for row in rows) / 100)
    spent = sum(row.price / 100 + horde_tax(row.price / 100) for row in rows)
    assert client.balance(requester) == pytest.approx(5000 - spent)
    books_balance(client)


def test_rabbitmq_restart_under_load_loses_no_accepted_job(private: PrivateHorde, models_dir: Path) -> None:
    ride_out(private, models_dir, lambda: private.rabbit.restart(down_seconds=2.0), "BrokerUnavailable", "rabbit")
    # Every consumer of the API and the ledger subscribed again, not only those the jobs exercised.
    connection = pika.BlockingConnection(pika.URLParameters(private.settings.rabbitmq_url))
    try:
        channel = connection.channel()
        for queue in (ASKS_QUEUE, CLAIMS_QUEUE, RESULTS_QUEUE, LEDGER_QUEUE, HEARTBEATS_QUEUE, DEAD_QUEUE):
            assert channel.queue_declare(queue, passive=True).method.consumer_count >= 1, queue
    finally:
        connection.close()


def test_postgres_restart_under_load_loses_no_accepted_job(private: PrivateHorde, models_dir: Path) -> None:
    def restart() -> None:
        private.postgres.restart(down_seconds=3.0)
        private.client.engine.dispose()  # the test's own pooled connections died with the server

    ride_out(private, models_dir, restart, "DatabaseUnavailable", "pg")


# --- the dispatcher ------------------------------------------------------------------------------------


def test_a_standby_dispatcher_takes_over_when_the_leader_dies(private: PrivateHorde, models_dir: Path) -> None:
    """Two API processes: one leads the dispatcher, the other stands by. SIGKILL the leader: the
    other takes over within seconds, the waiting worker's repeated ask reaches it, jobs flow again."""
    client = private.client
    requester, owner = client.user("failover-requester", kudos=500), client.user("failover-owner")
    standby_settings = private.settings.model_copy(update={"api_port": free_port()})
    standby = start_api(standby_settings, name="api-standby")
    standby_client = HordeClient(standby_settings)
    worker = private.worker("w-failover", owner, models_dir)
    try:
        assert "this process leads" in private.api.log() and "this process leads" not in standby.log()
        first = client.submit(requester, prompt="before", models=["tiny-e2e"], params=TINY)
        assert client.wait_done(first)["done"]
        private.api.kill()
        killed = time.monotonic()
        after = standby_client.submit(requester, prompt="after", models=["tiny-e2e"], params=TINY)
        assert standby_client.wait_done(after, timeout=60)["done"]
        took = time.monotonic() - killed
        standby.wait_for_log("this process leads", timeout=5)
        # Stand-by retries every 2 s, the worker repeats its ask every 2 s (HORDE_ASK_REFRESH_SECONDS).
        assert took < 15, f"jobs flowed again only after {took:.1f}s"
    finally:
        private.api = start_api(private.settings)  # the module's other tests need the first API back
        standby.stop()
        standby_client.close()
        worker.stop()
        private.started.remove(worker)
    rows = client.job_rows(first) + client.job_rows(after)
    assert {row.worker_id for row in rows} == {worker_ids(client)["w-failover"]}
    settled_once(client, [row.id for row in rows])
    # The restarted API leads again once the stand-by has gone.
    wait_until(lambda: "this process leads" in private.api.log(), 20, "the API to lead again", private.api)


def test_a_worker_that_died_while_waiting_is_skipped_not_leased(
        horde: HordeClient, settings: Settings, models_dir: Path) -> None:
    """A worker asks and dies before a job comes. The job is not leased to it (which would hold it
    until the lease expired): the dispatcher probes a waiting ask older than a second before
    answering, finds its reply-to gone, and gives the job to the live worker."""
    owner = horde.user("owner-waits-alive")
    horde.register_worker("w-waits-dead", horde.user("owner-waits-dead"))
    horde.register_worker("w-waits-alive", owner)
    dead = ManualWorker(settings.rabbitmq_url, "w-waits-dead")
    assert dead.ask(["tiny-waiting"], seconds=0.5) is None  # waiting: no job yet
    alive = start_worker(settings, "w-waits-alive", ["tiny-waiting"], models_dir)
    try:
        dead.close()  # its ask is still the oldest the dispatcher holds
        time.sleep(1.5)
        started = time.monotonic()
        request_id = horde.submit(None, prompt="for the living", models=["tiny-waiting"], params=TINY)
        status = horde.wait_done(request_id, timeout=30)
        took = time.monotonic() - started
    finally:
        alive.stop()
    [job] = horde.job_rows(request_id)
    assert status["generations"][0]["worker_name"] == "w-waits-alive" and job.attempts == 0
    assert took < 10, f"done after {took:.1f}s"
    assert "w-waits-dead is gone" in (settings.state_dir / "logs" / "api.log").read_text()
