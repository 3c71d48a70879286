"""Poison messages on every consumer queue: dead-lettered to ``horde.dead``, recorded for admins,
consumers alive; and a job a worker drops is put back at once (a few times at most).

Real API, ledger and worker processes on the session's vhost; messages published with pika.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pika
import pytest
import sqlalchemy as sa

from api.dead_letters import REPUBLISH_LIMIT
from api.roles import set_role
from api.tables import dead_letters
from broker.topology import (
    CLAIMS_QUEUE, DEAD_QUEUE, EVENTS_EXCHANGE, HEARTBEATS_QUEUE, JOBS_EXCHANGE, LEDGER_QUEUE, RESULTS_QUEUE,
    claim_key, completed_key, heartbeat_key, job_queue,
)
from config import Settings
from ledger.pricing import horde_tax
from tests.e2e import HordeClient, User
from tests.processes import start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}
DEAD_LETTERS = "/api/v2/admin/dead-letters"


def letters(horde: HordeClient, message_ids: list[str]) -> dict[str, Any]:
    with horde.engine.connect() as conn:
        rows = conn.execute(sa.select(dead_letters).where(dead_letters.c.message_id.in_(message_ids))).all()
    return {row.message_id: row for row in rows}


def publish_poison(settings: Settings, tag: str) -> dict[str, tuple[str, str]]:
    """Garbage and wrong-type messages to every consumer; returns message_id -> (queue, what)."""
    user = pika.URLParameters(settings.rabbitmq_url).credentials.username
    cases = [
        (EVENTS_EXCHANGE, claim_key("w-dead"), "claim.v1", b"\x00\xffnot json", CLAIMS_QUEUE),
        (EVENTS_EXCHANGE, claim_key("w-dead"), "job.v1", b'{"job_id": "x"}', CLAIMS_QUEUE),
        (EVENTS_EXCHANGE, completed_key("w-dead"), "job-completed.v1", b"{{{{", RESULTS_QUEUE),
        (EVENTS_EXCHANGE, completed_key("w-dead"), "what.v9", b'{"job_id": "x"}', RESULTS_QUEUE),
        (EVENTS_EXCHANGE, "job.done", "job-done.v1", b"[1, 2, 3]", LEDGER_QUEUE),
        (EVENTS_EXCHANGE, "job.done", "claim.v1", b'{"job_id": "x"}', LEDGER_QUEUE),
        (JOBS_EXCHANGE, "tiny-dead", "job.v1", b"\x89PNG garbage", job_queue("tiny-dead")),
        (JOBS_EXCHANGE, "tiny-dead", "job-done.v1", b'{"job_id": "x"}', job_queue("tiny-dead")),
        (EVENTS_EXCHANGE, heartbeat_key("w-dead"), "worker-heartbeat.v1", b"\x00", HEARTBEATS_QUEUE),
    ]
    sent: dict[str, tuple[str, str]] = {}
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for i, (exchange, key, kind, body, queue) in enumerate(cases):
            message_id = f"poison-{tag}-{i}"
            channel.basic_publish(exchange, key, body, pika.BasicProperties(
                message_id=message_id, type=kind, user_id=user, delivery_mode=2), mandatory=True)
            sent[message_id] = (queue, kind)
    finally:
        connection.close()
    return sent


def consumers(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    finally:
        connection.close()


def admin(horde: HordeClient, alias: str) -> User:
    user = horde.user(alias)
    with horde.engine.begin() as conn:
        set_role(conn, user.id, "admin", granted=True)
    return user


def test_poison_on_every_queue_is_dead_lettered_and_consumers_keep_working(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    tag = uuid.uuid4().hex[:6]
    requester, owner = horde.user("poison-requester", kudos=100), horde.user("poison-owner")
    horde.register_worker("w-dead", owner)
    worker = start_worker(settings, "w-dead", ["tiny-dead"], models_dir)
    try:
        sent = publish_poison(settings, tag)
        expected = {m: q for m, (q, _) in sent.items()}
        wait_until(lambda: len(letters(horde, list(expected))) == len(expected), 30, "every poison recorded")
        for message_id, row in letters(horde, list(expected)).items():
            assert (row.queue, row.reason, row.action) == (expected[message_id], "rejected", "recorded"), row
            assert row.type == sent[message_id][1] and row.user_id == "guest" and row.body
        # Every consumer is still there and still works: a real job is claimed, done and settled.
        for queue in (CLAIMS_QUEUE, RESULTS_QUEUE, LEDGER_QUEUE, HEARTBEATS_QUEUE, DEAD_QUEUE, job_queue("tiny-dead")):
            assert consumers(settings, queue) >= 1, queue
        request_id = horde.submit(requester, prompt="after the poison", models=["tiny-dead"], params=TINY)
        status = horde.wait_done(request_id)
        assert status["done"] and status["generations"][0]["worker_name"] == "w-dead"
        [job] = horde.job_rows(request_id)
        horde.wait_balance(owner, job.price / 100)
        assert horde.balance(requester) == pytest.approx(100 - job.price / 100 - horde_tax(job.price / 100))
        assert len(horde.ledger_entries(job.id)) == 4
        assert worker.alive()
    finally:
        worker.stop()
    # The heartbeats' queue has no dead-letter exchange (expired heartbeats must not pile up): the
    # uptime service dead-letters a malformed one itself, under the same row shape as the others.
    api_log = (settings.state_dir / "logs" / "api.log").read_text(errors="replace")
    assert "dead-lettering a malformed heartbeat" in api_log
    assert "dead letter from horde.claims (rejected)" in api_log


def test_admins_page_through_dead_letters_and_others_are_refused(horde: HordeClient, settings: Settings) -> None:
    tag = uuid.uuid4().hex[:6]
    sent = publish_poison(settings, tag)
    ids = [m for m, (q, _) in sent.items() if q in (CLAIMS_QUEUE, RESULTS_QUEUE, LEDGER_QUEUE)]
    wait_until(lambda: len(letters(horde, ids)) == len(ids), 30, "the poison recorded")
    boss, nobody = admin(horde, f"dl-admin-{tag}"), horde.user(f"dl-nobody-{tag}")

    refused = horde.http.get(DEAD_LETTERS, headers={"apikey": nobody.apikey})
    assert refused.status_code == 403 and refused.json()["rc"] == "NotAdmin", refused.text
    assert horde.http.get(DEAD_LETTERS).status_code in (401, 403)
    bad = horde.http.get(DEAD_LETTERS, params={"per_page": 0}, headers={"apikey": boss.apikey})
    assert bad.status_code == 400 and bad.json()["rc"] == "BadRequest"

    headers = {"apikey": boss.apikey}
    page = horde.http.get(DEAD_LETTERS, params={"per_page": 500}, headers=headers).json()
    listed = {row["message_id"]: row for row in page["dead_letters"]}
    assert set(ids) <= set(listed)
    row = listed[ids[0]]
    assert row["queue"] == CLAIMS_QUEUE and row["reason"] == "rejected" and row["action"] == "recorded"
    assert row["body"] and row["time"].endswith("+00:00")
    newest_first = [r["id"] for r in page["dead_letters"]]
    assert newest_first == sorted(newest_first, reverse=True)
    first = horde.http.get(DEAD_LETTERS, params={"per_page": 1}, headers=headers).json()
    second = horde.http.get(DEAD_LETTERS, params={"per_page": 1, "page": 2}, headers=headers).json()
    assert first["has_more"] and len(first["dead_letters"]) == 1
    assert second["dead_letters"][0]["id"] < first["dead_letters"][0]["id"]
    only_ledger = horde.http.get(DEAD_LETTERS, params={"queue": LEDGER_QUEUE, "per_page": 500}, headers=headers).json()
    assert only_ledger["dead_letters"] and {r["queue"] for r in only_ledger["dead_letters"]} == {LEDGER_QUEUE}


class Vandal:
    """A worker that takes every job from its queue and rejects it (requeue=False)."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=1)
        self.rejected = 0
        self.channel.basic_consume(job_queue(model), self._reject)

    def _reject(self, channel, method, _properties, _body) -> None:  # type: ignore[no-untyped-def]
        channel.basic_reject(method.delivery_tag, requeue=False)
        self.rejected += 1

    def run_until(self, predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"vandal gave up after rejecting {self.rejected}"
            self.connection.process_data_events(time_limit=0.1)

    def close(self) -> None:
        self.connection.close()


def test_a_dropped_job_is_republished_at_once_a_few_times_then_left_to_the_reconciler(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    requester, owner = horde.user("vandalised", kudos=100), horde.user("honest-owner")
    horde.register_worker("w-honest", owner)
    vandal = Vandal(settings, "tiny-vandal")
    request_id = horde.submit(requester, prompt="drop me", models=["tiny-vandal"], params=TINY)
    [job] = horde.job_rows(request_id)

    def actions() -> list[str]:
        with horde.engine.connect() as conn:
            return list(conn.execute(sa.select(dead_letters.c.action).where(dead_letters.c.message_id == job.id))
                        .scalars())

    try:
        # The first drop comes back well before the reconciler's republish_after (3 s) would act.
        started = time.monotonic()
        vandal.run_until(lambda: vandal.rejected >= 2, 10)
        assert time.monotonic() - started < settings.republish_after_seconds
        vandal.run_until(lambda: "not-republished" in actions(), 30)
    finally:
        vandal.close()
    assert actions().count("republished") == REPUBLISH_LIMIT
    assert horde.job_rows(request_id)[0].state == "queued"
    # The reconciler still brings it back; an honest worker does it and is paid once.
    worker = start_worker(settings, "w-honest", ["tiny-vandal"], models_dir)
    try:
        status = horde.wait_done(request_id, timeout=60)
    finally:
        worker.stop()
    assert status["generations"][0]["worker_name"] == "w-honest"
    horde.wait_balance(owner, job.price / 100)
    assert horde.balance(requester) == pytest.approx(100 - job.price / 100 - horde_tax(job.price / 100))
