"""The ledger consumer against real RabbitMQ and PostgreSQL: settles each job once, dead-letters
what it must not settle, survives database failures and a crash between commit and ack.

Each test gets a fresh vhost; accounts are random so tests never share balances.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pika
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

import ledger.consumer as consumer_module
import migrations
from broker.messages import JobDone, JobsDone
from broker.topology import DEAD_QUEUE, EVENTS_EXCHANGE, JOB_DONE_KEY, LEDGER_QUEUE
from config import Settings
from config.database import make_sync_engine
from ledger import book
from ledger.consumer import BatchResult, Delivery, LedgerConsumer, apply_batch, run, screen
from ledger.errors import LedgerError, PartlyRefused, RefusedMessage
from ledger.tables import entries
from tests import services

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def vhost_url() -> Iterator[str]:
    url = services.create_vhost("horde-ledger-test")
    yield url
    services.delete_vhost(url)


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_sync_engine(database_url)
    yield eng
    eng.dispose()


def make_settings(database_url: str, rabbitmq_url: str, tmp_path: Path, **overrides: object) -> Settings:
    return Settings(database_url=database_url, rabbitmq_url=rabbitmq_url, state_dir=tmp_path, **overrides)


@contextmanager
def running(consumer: LedgerConsumer) -> Iterator[LedgerConsumer]:
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            consumer.serve()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert consumer.ready.wait(15), errors
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(15)
    assert not thread.is_alive()
    assert not errors, errors


def accounts() -> tuple[int, int]:
    base = random.randrange(10_000_000, 1_000_000_000, 2)
    return base, base + 1


def job_done(requester: int, owner: int, kudos: float = 4.5) -> JobDone:
    return JobDone(
        job_id=str(uuid.uuid4()), request_id=str(uuid.uuid4()), requester_id=requester, worker_id=3,
        worker_owner_id=owner, worker_name="gpu-box", model="tiny-sd", kind="image", kudos=kudos,
        finished_at=datetime.now(timezone.utc),
    )


def publish(url: str, body: bytes, *, message_id: str | None, type_: str | None = JobDone.schema_name,
            user_id: str | None = "guest") -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(message_id=message_id, type=type_, user_id=user_id,
                                     content_type="application/json", delivery_mode=2)
        channel.basic_publish(EVENTS_EXCHANGE, JOB_DONE_KEY, body, props, mandatory=True)
    finally:
        connection.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def dead_letters(url: str) -> dict[str, pika.BasicProperties]:
    """Drain horde.dead: message_id -> properties."""
    found = {}
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        while True:
            method, props, _body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
            if method is None:
                return found
            found[props.message_id] = props
    finally:
        connection.close()


def queue_depth(url: str, queue: str = LEDGER_QUEUE) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def entry_count(engine: Engine, job_id: str) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).where(entries.c.job_id == job_id)).scalar_one()


def units(engine: Engine, account: int) -> int:
    with engine.connect() as conn:
        return book.balance_units(conn, account)


# --- screening and batches, without RabbitMQ ---------------------------------------------------


def delivery(body: bytes, *, tag: int = 1, message_id: str | None = "m", user_id: str | None = "guest",
             type_: str | None = JobDone.schema_name) -> Delivery:
    return Delivery(tag=tag, message_id=message_id, user_id=user_id, type=type_, body=body)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"type_": "job-completed.v1"}, "is not one of"),
        ({"type_": None}, "is not one of"),
        ({"user_id": None}, "no user_id"),
        ({"user_id": "gpu-box"}, "not trusted"),
        ({"message_id": None}, "message_id"),
        ({"message_id": "x" * 121}, "message_id"),
    ],
)
def test_screen_refuses_what_the_ledger_must_not_settle(kwargs: dict, reason: str) -> None:
    done = job_done(1, 2)
    with pytest.raises(RefusedMessage, match=reason):
        screen(delivery(done.encode(), **kwargs), {"guest"})


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"job_id": "j"}', job_done(-1, 2).encode()])
def test_screen_refuses_bodies_that_are_not_a_settleable_job_done(body: bytes) -> None:
    with pytest.raises(RefusedMessage):
        screen(delivery(body), {"guest"})


def test_screen_expands_a_group_to_one_settlement_per_job_keyed_as_its_own_event() -> None:
    events = [job_done(1, 2, kudos=k) for k in (1, 2, 3)]
    group = JobsDone(events=events).encode()

    settlements = screen(delivery(group, tag=7, message_id="jobs-done:g", type_=JobsDone.schema_name), {"guest"})

    assert [s.message_id for s in settlements] == [f"job-done:{e.job_id}" for e in events]
    assert {s.tag for s in settlements} == {7}
    assert [s.posting.legs[1].amount for s in settlements if s.posting] == [100, 200, 300]
    # An event that cannot be settled (here: it would debit MINT) leaves the others to settle.
    bad = JobsDone(events=[events[0], job_done(-1, 2), events[1]]).encode()
    with pytest.raises(PartlyRefused, match="1 of 3 events refused") as partly:
        screen(delivery(bad, message_id="jobs-done:bad", type_=JobsDone.schema_name), {"guest"})
    assert [s.message_id for s in partly.value.settlements] == [f"job-done:{e.job_id}" for e in events[:2]]
    only_bad = JobsDone(events=[job_done(-1, 2)]).encode()
    with pytest.raises(RefusedMessage, match="1 of 1 events refused") as whole:
        screen(delivery(only_bad, message_id="jobs-done:only-bad", type_=JobsDone.schema_name), {"guest"})
    assert not isinstance(whole.value, PartlyRefused)
    with pytest.raises(RefusedMessage):  # an empty group is malformed
        screen(delivery(b'{"events": []}', message_id="jobs-done:empty", type_=JobsDone.schema_name), {"guest"})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_apply_batch_settles_each_message_and_each_job_once(backend: str, database_url: str,
                                                            tmp_path: Path) -> None:
    url = database_url
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        migrations.upgrade(url)
    eng = make_sync_engine(url)
    requester, owner = accounts()
    a, b = job_done(requester, owner, kudos=1), job_done(requester, owner, kudos=2)
    first = [*screen(delivery(a.encode(), tag=1, message_id="a1"), {"guest"}),
             *screen(delivery(a.encode(), tag=2, message_id="a1"), {"guest"}),  # same message twice
             *screen(delivery(a.encode(), tag=3, message_id="a2"), {"guest"}),  # same job, other message
             *screen(delivery(b.encode(), tag=4, message_id="b1"), {"guest"})]
    try:
        with eng.connect() as conn, conn.begin() as transaction:
            assert apply_batch(conn, first, now=NOW) == BatchResult(settled=2, duplicates=2)
            assert apply_batch(conn, first, now=NOW) == BatchResult(settled=0, duplicates=4)  # redelivered
            assert (book.balance_units(conn, requester), book.balance_units(conn, owner)) == (-300 - 15, 300)  # + tax
            transaction.rollback()
    finally:
        eng.dispose()


# --- the consumer on a real broker -----------------------------------------------------------


def test_duplicate_events_settle_a_job_once(database_url: str, vhost_url: str, engine: Engine,
                                            tmp_path: Path) -> None:
    requester, owner = accounts()
    done = job_done(requester, owner, kudos=4.5)
    sentinel = job_done(requester, owner, kudos=0.5)

    with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
        publish(vhost_url, done.encode(), message_id="m-1")
        publish(vhost_url, done.encode(), message_id="m-1")  # the same message again
        publish(vhost_url, done.encode(), message_id="m-2")  # another event for the same job
        publish(vhost_url, sentinel.encode(), message_id="m-3")
        wait_for(lambda: entry_count(engine, sentinel.job_id) == 4, what="the sentinel to settle")

    assert entry_count(engine, done.job_id) == 4
    assert (units(engine, requester), units(engine, owner)) == (-500 - 23 - 3, 500)  # + 5% tax each
    assert queue_depth(vhost_url) == 0  # every delivery acked
    assert dead_letters(vhost_url) == {}


def test_an_untrusted_publisher_is_dead_lettered_and_not_settled(database_url: str, vhost_url: str,
                                                                engine: Engine, tmp_path: Path) -> None:
    requester, owner = accounts()
    done = job_done(requester, owner)
    settings = make_settings(database_url, vhost_url, tmp_path, trusted_amqp_users=["someone-else"])

    with running(LedgerConsumer(settings, engine)):
        publish(vhost_url, done.encode(), message_id="forged-1")
        publish(vhost_url, done.encode(), message_id="forged-2", user_id=None)
        wait_for(lambda: queue_depth(vhost_url, DEAD_QUEUE) == 2, what="dead letters")

    assert set(dead_letters(vhost_url)) == {"forged-1", "forged-2"}
    assert entry_count(engine, done.job_id) == 0
    assert units(engine, requester) == 0


def test_malformed_messages_are_dead_lettered_and_the_consumer_goes_on(database_url: str, vhost_url: str,
                                                                     engine: Engine, tmp_path: Path) -> None:
    requester, owner = accounts()
    later = job_done(requester, owner, kudos=1.25)
    wrong_kind = job_done(requester, -1)  # would debit MINT: refused by the ledger

    with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
        publish(vhost_url, b"{not json", message_id="bad-json")
        publish(vhost_url, b'{"job_id": "x"}', message_id="bad-fields")
        publish(vhost_url, later.encode(), message_id="bad-type", type_="job.v1")
        publish(vhost_url, later.encode(), message_id=None)
        publish(vhost_url, wrong_kind.encode(), message_id="bad-account")
        publish(vhost_url, later.encode(), message_id="good")
        wait_for(lambda: entry_count(engine, later.job_id) == 4, what="the valid message to settle")

    assert set(dead_letters(vhost_url)) == {"bad-json", "bad-fields", "bad-type", None, "bad-account"}
    assert (units(engine, requester), units(engine, owner)) == (-125 - 6, 125)  # + tax
    assert queue_depth(vhost_url) == 0


def test_a_database_failure_requeues_and_the_consumer_recovers(database_url: str, vhost_url: str, engine: Engine,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requester, owner = accounts()
    done = job_done(requester, owner, kudos=2)
    real_apply = consumer_module.apply_batch
    calls = []

    def flaky_apply(conn, settlements, *, now):  # type: ignore[no-untyped-def]
        calls.append(len(settlements))
        if len(calls) == 1:
            raise OperationalError("INSERT …", {}, Exception("server closed the connection unexpectedly"))
        return real_apply(conn, settlements, now=now)

    monkeypatch.setattr(consumer_module, "apply_batch", flaky_apply)
    with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
        publish(vhost_url, done.encode(), message_id="retry-me")
        wait_for(lambda: entry_count(engine, done.job_id) == 4, what="the settlement after the retry")

    assert len(calls) >= 2
    assert (units(engine, requester), units(engine, owner)) == (-200 - 10, 200)  # + tax
    assert queue_depth(vhost_url) == 0
    assert dead_letters(vhost_url) == {}


def test_deliveries_within_the_linger_share_one_commit(database_url: str, vhost_url: str, engine: Engine,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five events 50 ms apart, within one (lengthened) linger: one batch, one commit."""
    requester, owner = accounts()
    events = [job_done(requester, owner, kudos=1) for _ in range(5)]
    real_apply = consumer_module.apply_batch
    batches: list[int] = []

    def counting_apply(conn, settlements, *, now):  # type: ignore[no-untyped-def]
        batches.append(len(settlements))
        return real_apply(conn, settlements, now=now)

    monkeypatch.setattr(consumer_module, "apply_batch", counting_apply)
    monkeypatch.setattr(consumer_module, "LINGER_SECONDS", 2.0)
    connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
            for event in events:
                props = pika.BasicProperties(message_id=f"linger-{event.job_id}", type=JobDone.schema_name,
                                             user_id="guest", delivery_mode=2)
                channel.basic_publish(EVENTS_EXCHANGE, JOB_DONE_KEY, event.encode(), props, mandatory=True)
                time.sleep(0.05)
            wait_for(lambda: all(entry_count(engine, e.job_id) == 4 for e in events), what="the five settlements")
    finally:
        connection.close()

    assert batches == [5]
    assert units(engine, owner) == 500
    assert queue_depth(vhost_url) == 0


def publish_group(url: str, events: list[JobDone], message_id: str) -> None:
    publish(url, JobsDone(events=events).encode(), message_id=message_id, type_=JobsDone.schema_name)


def test_a_job_announced_alone_and_in_groups_is_settled_once(database_url: str, vhost_url: str, engine: Engine,
                                                              tmp_path: Path) -> None:
    """The results service may announce a job again (a redelivered completion), in another group:
    the inbox keys each job, whatever message carried it."""
    requester, owner = accounts()
    a, b, c = (job_done(requester, owner, kudos=k) for k in (1, 2, 4))

    with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
        publish(vhost_url, a.encode(), message_id=f"job-done:{a.job_id}")  # alone, as job-done.v1
        publish_group(vhost_url, [a, b], "jobs-done:1")
        publish_group(vhost_url, [b, c], "jobs-done:2")
        publish_group(vhost_url, [b, c], "jobs-done:2")  # the same group again
        wait_for(lambda: entry_count(engine, c.job_id) == 4, what="the last group to settle")
        wait_for(lambda: queue_depth(vhost_url) == 0, what="every delivery acked")

    assert [entry_count(engine, e.job_id) for e in (a, b, c)] == [4, 4, 4]
    assert (units(engine, requester), units(engine, owner)) == (-700 - 5 - 10 - 20, 700)  # + 5% tax each
    assert dead_letters(vhost_url) == {}


def test_a_group_with_a_refused_event_settles_the_others_then_is_dead_lettered(
        database_url: str, vhost_url: str, engine: Engine, tmp_path: Path) -> None:
    requester, owner = accounts()
    first, last, sentinel = (job_done(requester, owner, kudos=k) for k in (1, 2, 4))
    refused = job_done(requester, -1)  # would credit MINT: the ledger refuses it

    with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
        publish_group(vhost_url, [first, refused, last], "jobs-done:partly")
        publish_group(vhost_url, [sentinel], "jobs-done:after")
        wait_for(lambda: entry_count(engine, sentinel.job_id) == 4, what="the next group to settle")
        wait_for(lambda: queue_depth(vhost_url) == 0, what="every delivery settled")

    assert [entry_count(engine, e.job_id) for e in (first, last, refused)] == [4, 4, 0]
    assert (units(engine, requester), units(engine, owner)) == (-700 - 5 - 10 - 20, 700)  # + 5% tax each
    assert set(dead_letters(vhost_url)) == {"jobs-done:partly"}


def test_a_refused_batch_is_settled_delivery_by_delivery_keeping_groups_whole(
        database_url: str, vhost_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch the database refuses for good is retried one delivery at a time, a group in one
    transaction: the group holding the bad job is dead-lettered whole, each other delivery is
    settled and acked once (acking a group's tag per event would close the channel)."""
    requester, owner = accounts()
    alone, poisoned, spoiler, g1, g2 = (job_done(requester, owner, kudos=1) for _ in range(5))
    real_apply = consumer_module.apply_batch
    batches: list[int] = []

    def refusing_apply(conn, settlements, *, now):  # type: ignore[no-untyped-def]
        batches.append(len(settlements))
        if any(s.message_id == f"job-done:{spoiler.job_id}" for s in settlements):
            raise LedgerError("refused for the test")
        return real_apply(conn, settlements, now=now)

    monkeypatch.setattr(consumer_module, "apply_batch", refusing_apply)
    monkeypatch.setattr(consumer_module, "LINGER_SECONDS", 2.0)  # the three deliveries make one batch
    with running(LedgerConsumer(make_settings(database_url, vhost_url, tmp_path), engine)):
        publish(vhost_url, alone.encode(), message_id="alone")
        publish_group(vhost_url, [poisoned, spoiler], "jobs-done:poisoned")
        publish_group(vhost_url, [g1, g2], "jobs-done:good")
        wait_for(lambda: queue_depth(vhost_url, DEAD_QUEUE) == 1, what="the poisoned group's dead letter")
        wait_for(lambda: entry_count(engine, g2.job_id) == 4, what="the good group to settle")

    assert batches == [5, 1, 2, 2]  # the batch, then delivery by delivery
    assert [entry_count(engine, e.job_id) for e in (alone, g1, g2, poisoned, spoiler)] == [4, 4, 4, 0, 0]
    assert set(dead_letters(vhost_url)) == {"jobs-done:poisoned"}
    assert queue_depth(vhost_url) == 0


class CrashBeforeFirstAck(LedgerConsumer):
    """Loses its connection right after its first commit, as if killed between commit and ack."""

    crashed = False
    acks = 0

    def _ack(self, channel, tag, *, multiple):  # type: ignore[no-untyped-def]
        if not self.crashed:
            self.crashed = True
            raise pika.exceptions.StreamLostError("simulated crash between commit and ack")
        super()._ack(channel, tag, multiple=multiple)
        self.acks += 1


def test_redelivery_after_a_crash_between_commit_and_ack_settles_once(database_url: str, vhost_url: str,
                                                                      engine: Engine, tmp_path: Path) -> None:
    requester, owner = accounts()
    done = job_done(requester, owner, kudos=3)
    consumer = CrashBeforeFirstAck(make_settings(database_url, vhost_url, tmp_path), engine)

    with running(consumer):
        publish(vhost_url, done.encode(), message_id="crash-1")
        wait_for(lambda: consumer.acks >= 1, timeout=20, what="the redelivery to be acked")

    assert consumer.crashed
    assert entry_count(engine, done.job_id) == 4
    assert (units(engine, requester), units(engine, owner)) == (-300 - 15, 300)  # + tax
    assert queue_depth(vhost_url) == 0


def test_run_says_clearly_when_rabbitmq_is_unreachable(database_url: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(database_url, "amqp://guest:guest@127.0.0.1:1/", tmp_path)

    assert run(settings) == 1

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Cannot reach RabbitMQ" in err


def test_horde_ledger_process_is_ready_and_stops_on_sigterm(database_url: str, vhost_url: str) -> None:
    env = {**os.environ, "HORDE_DATABASE_URL": database_url, "HORDE_RABBITMQ_URL": vhost_url, "HORDE_LOG_LEVEL": "INFO"}
    code = "import sys; from config import Settings; from ledger.consumer import run; sys.exit(run(Settings()))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "ledger consumer ready" in line:
                break
        assert any("ledger consumer ready" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
