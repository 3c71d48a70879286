"""A registered worker turned hostile, with its own real credentials (pika, straight to the broker).

What its RabbitMQ permissions forbid is refused by the broker, with the exact error: above all it
reads no shared queue, so it can neither purge, hoard, lock nor drop the models' queues. What they
allow but the horde must not honour (completions of jobs it does not hold, forged claims and
asks, replays, cherry-picking a job by id, hoarding leases) is refused or ignored by the horde,
logged in ``moderation_log`` and counted as strikes; no kudos move.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from PIL import Image
from pika.adapters.blocking_connection import BlockingChannel

from api.tables import moderation_log, workers
from broker.messages import JobCompleted, JobDone
from broker.topology import (
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    completed_key,
    job_queue,
    worker_queue,
)
from config import Settings
from ledger.pricing import horde_tax
from tests.e2e import HordeClient, User
from tests.manual_worker import ManualWorker
from tests.processes import wait_until

TINY = {"width": 64, "height": 64, "steps": 4}
MODEL_A, MODEL_B = "tiny-hostile", "tiny-hostile-b"


@dataclass(frozen=True)
class Registered:
    id: int
    name: str
    user: str
    url: str
    owner: User


class AmqpClient(ManualWorker):
    """One registered worker's own connection, speaking the real protocol or misbehaving."""

    def __init__(self, worker: Registered) -> None:
        super().__init__(worker.url, worker.name)
        self.worker = worker

    def refused(self, action: Callable[[BlockingChannel], object]) -> tuple[int, str]:
        """Run ``action`` on a fresh channel; the broker's closing code and text."""
        channel = self.open_channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            action(channel)
        return closed.value.reply_code, closed.value.reply_text


def register(horde: HordeClient, alias: str, name: str, models: list[str]) -> Registered:
    owner = horde.user(alias)
    response = horde.http.post("/api/v2/workers", json={"name": name, "models": models},
                               headers={"apikey": owner.apikey})
    assert response.status_code == 201, response.text
    body = response.json()
    return Registered(int(body["id"]), name, body["amqp_user"], body["amqp_url"], owner)


@pytest.fixture(scope="module")
def pair(horde: HordeClient) -> Iterator[tuple[AmqpClient, AmqpClient]]:
    a = AmqpClient(register(horde, "hostile-owner-a", "hostile-a", [MODEL_A]))
    b = AmqpClient(register(horde, "hostile-owner-b", "hostile-b", [MODEL_B]))
    yield a, b
    a.close()
    b.close()


def tiny_webp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(out, format="WEBP")
    return out.getvalue()


def completion(job_id: str, lease_id: str, worker: str, model: str) -> JobCompleted:
    return JobCompleted(job_id=job_id, lease_id=lease_id, worker=worker, model=model, seed="1", image=tiny_webp(),
                        width=64, height=64, generation_seconds=0.1)


def strikes(horde: HordeClient, worker_id: int) -> int:
    with horde.engine.connect() as conn:
        return conn.execute(sa.select(workers.c.strikes).where(workers.c.id == worker_id)).scalar_one()


def offences(horde: HordeClient, worker_id: int) -> list[Any]:
    with horde.engine.connect() as conn:
        return list(conn.execute(sa.select(moderation_log).where(moderation_log.c.worker_id == worker_id)
                                 .order_by(moderation_log.c.id)))


def access_refused(what: str, name: str, vhost_user: tuple[str, str]) -> str:
    vhost, user = vhost_user
    return f"ACCESS_REFUSED - access to {what} '{name}' in vhost '{vhost}' refused for user '{user}'"


# --- what the broker refuses -----------------------------------------------------------------------


def test_broker_refuses_what_the_permissions_forbid(pair: tuple[AmqpClient, AmqpClient], settings: Settings) -> None:
    a, b = pair
    vhost = pika.URLParameters(settings.rabbitmq_url).virtual_host
    who = (vhost, a.worker.user)
    other_queue = job_queue(MODEL_B)
    job = completion(str(uuid.uuid4()), str(uuid.uuid4()), a.worker.name, MODEL_A)

    assert a.refused(lambda ch: ch.basic_consume(other_queue, lambda *_: None)) == (
        403, access_refused("queue", other_queue, who))
    # Its own model's queue too: only the dispatcher reads the shared queues, so no worker can
    # purge one (the one thing the watchdog could not attribute), hoard, lock or drop its jobs.
    own_model = job_queue(MODEL_A)
    assert a.refused(lambda ch: ch.queue_purge(own_model)) == (403, access_refused("queue", own_model, who))
    assert a.refused(lambda ch: ch.basic_consume(own_model, lambda *_: None, exclusive=True)) == (
        403, access_refused("queue", own_model, who))
    assert a.refused(lambda ch: ch.basic_get(own_model)) == (403, access_refused("queue", own_model, who))
    assert a.refused(lambda ch: ch.basic_get(worker_queue(b.worker.name))) == (
        403, access_refused("queue", worker_queue(b.worker.name), who))
    assert a.refused(lambda ch: ch.basic_get("horde.ledger")) == (403, access_refused("queue", "horde.ledger", who))
    # Forge a job, straight to the jobs exchange or through the default exchange.
    assert a.refused(lambda ch: a.publish(MODEL_A, job, exchange=JOBS_EXCHANGE, channel=ch)) == (
        403, access_refused("exchange", JOBS_EXCHANGE, who))
    assert a.refused(lambda ch: a.publish(job_queue(MODEL_A), job, exchange="", channel=ch)) == (
        403, access_refused("exchange", "amq.default", who))
    # Declare or delete anything.
    assert a.refused(lambda ch: ch.queue_declare("hostile-inbox", durable=True)) == (
        403, access_refused("queue", "hostile-inbox", who))
    assert a.refused(lambda ch: ch.queue_delete(job_queue(MODEL_A))) == (
        403, access_refused("queue", job_queue(MODEL_A), who))
    assert a.refused(lambda ch: ch.exchange_declare("hostile-x", "fanout")) == (
        403, access_refused("exchange", "hostile-x", who))
    # Publish as another worker: its routing key, its user_id; or a trusted ledger event.
    other_key = completed_key(b.worker.name)
    assert a.refused(lambda ch: a.publish(other_key, job, channel=ch)) == (
        403, f"ACCESS_REFUSED - access to topic '{other_key}' in exchange '{EVENTS_EXCHANGE}' in vhost '{vhost}' "
             f"refused for user '{a.worker.user}'")
    assert a.refused(lambda ch: a.publish(completed_key(a.worker.name), job, user_id=b.worker.user, channel=ch)) == (
        406, f"PRECONDITION_FAILED - user_id property set to '{b.worker.user}' but authenticated user was "
             f"'{a.worker.user}'")
    done = JobDone(job_id=job.job_id, request_id=job.job_id, requester_id=0, worker_id=a.worker.id,
                   worker_owner_id=a.worker.owner.id, worker_name=a.worker.name, model=MODEL_A, kind="image",
                   kudos=1000.0, megapixelsteps=1.0, finished_at=time_now())
    assert a.refused(lambda ch: a.publish("job.done", done, channel=ch))[0] == 403
    assert a.refused(lambda ch: a.publish("kudos.uptime", done, channel=ch))[0] == 403
    # One connection may not be opened too often: the user limit holds.
    extra = [pika.BlockingConnection(pika.URLParameters(a.worker.url))
             for _ in range(settings.worker_max_connections - 1)]
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(pika.URLParameters(a.worker.url))
    finally:
        for connection in extra:
            connection.close()


def time_now():  # type: ignore[no-untyped-def]
    from config.database import utcnow

    return utcnow()


# --- what the horde ignores, logs and counts ---------------------------------------------------------


def test_horde_ignores_counts_and_never_pays_forged_completions(
        pair: tuple[AmqpClient, AmqpClient], horde: HordeClient, settings: Settings) -> None:
    a, b = pair
    requester = horde.user("hostile-requester", kudos=200)
    request_id = horde.submit(requester, prompt="b's job", models=[MODEL_B], params=TINY)
    [job] = horde.job_rows(request_id)
    before = strikes(horde, a.worker.id)

    # A forged claim: A's routing key, B's name in the body.
    assert a.claim(job.id, MODEL_B, as_worker=b.worker.name).granted is False
    # Nor can B cherry-pick it by id: a claim over AMQP is only for its own queue's copies.
    picked = b.claim(job.id, MODEL_B)
    assert picked is not None and not picked.granted and "serves first" in picked.reason
    lease = b.take(MODEL_B, job.id)
    assert lease.lease_id
    # A completes B's lease in its own name; then with B's name in the body on its own key.
    a.publish(completed_key(a.worker.name), completion(job.id, lease.lease_id, a.worker.name, MODEL_B))
    a.publish(completed_key(a.worker.name), completion(job.id, lease.lease_id, b.worker.name, MODEL_B))
    # A completes a job it was never delivered (queued on its own model, never claimed).
    never = horde.submit(requester, prompt="never delivered", models=[MODEL_A], params=TINY)
    [never_job] = horde.job_rows(never)
    a.publish(completed_key(a.worker.name), completion(never_job.id, str(uuid.uuid4()), a.worker.name, MODEL_A))
    wait_until(lambda: strikes(horde, a.worker.id) >= before + 4, 20, "A's four strikes")

    # B completes its lease: paid once. Then replays: A with B's old completion, B its own.
    real = completion(job.id, lease.lease_id, b.worker.name, MODEL_B)
    b.publish(completed_key(b.worker.name), real)
    status = horde.wait_done(request_id)
    assert [g["worker_name"] for g in status["generations"]] == [b.worker.name]
    price = job.price / 100
    horde.wait_balance(b.worker.owner, price)
    a.publish(completed_key(a.worker.name), completion(job.id, lease.lease_id, a.worker.name, MODEL_B))
    b.publish(completed_key(b.worker.name), real)
    wait_until(lambda: strikes(horde, a.worker.id) >= before + 5, 20, "A's strike for the replay")
    time.sleep(1.5)  # let the replays reach the ledger, if anything were to

    assert strikes(horde, a.worker.id) == before + 5
    assert strikes(horde, b.worker.id) == 0  # its own redelivered completion is no offence
    kinds = [o.kind for o in offences(horde, a.worker.id)][-5:]
    assert sorted(kinds) == ["forged_claim", "forged_completion", "stale_completion", "stale_completion",
                             "stale_completion"]
    details = [o.detail for o in offences(horde, a.worker.id)]
    assert all(d["amqp_user"] in (a.worker.user, None) for d in details)
    assert {d["job_id"] for d in details} >= {job.id, never_job.id}
    # No kudos moved but the one settlement: A's owner has nothing, B's owner the price once.
    assert horde.balance(a.worker.owner) == 0
    assert horde.balance(b.worker.owner) == pytest.approx(price)
    assert horde.balance(requester) == pytest.approx(200 - price - horde_tax(price))
    assert len(horde.ledger_entries(job.id)) == 4 and horde.ledger_entries(never_job.id) == []
    with horde.engine.connect() as conn:
        from api.tables import jobs

        assert conn.execute(sa.select(jobs.c.state).where(jobs.c.id == never_job.id)).scalar_one() == "queued"


def test_a_worker_holds_at_most_its_cap_of_leases_and_cannot_ask_as_another(
        pair: tuple[AmqpClient, AmqpClient], horde: HordeClient, settings: Settings) -> None:
    """Asking again and again without finishing anything hoards nothing: the dispatcher leases a
    worker at most ``max_leases_per_worker`` jobs, then answers "not now"; the rest wait for
    honest workers. An ask in another worker's name gets nothing and a strike."""
    a, b = pair
    requester = horde.user("hostile-hoard-requester", kudos=500)
    cap = settings.max_leases_per_worker
    requests = [horde.submit(requester, prompt=f"hoard {i}", models=[MODEL_A], params=TINY) for i in range(cap + 2)]
    offers = [a.ask([MODEL_A]) for _ in range(cap + 1)]
    granted = [o for o in offers if o is not None and o.granted]
    assert len(granted) == cap, offers
    refusal = offers[-1]
    assert refusal is not None and not refusal.granted and f"holds {cap} leases" in refusal.reason
    assert refusal.retry_after > 0
    with horde.engine.connect() as conn:
        from api.tables import jobs

        held = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.worker_id == a.worker.id, jobs.c.state == "claimed")).scalar_one()
    assert held == cap
    # Give them back (so the rest of the module finds the queue as it was): queued again, no attempt spent.
    for offer in granted:
        assert offer.job is not None
        given = a.claim(offer.job.job_id, MODEL_A, decline=True, lease_id=offer.lease_id)
        assert given is not None and given.reason == "given back; queued again"
    given_back = [o.job.job_id for o in granted if o.job is not None]
    with horde.engine.connect() as conn:
        rows = conn.execute(sa.select(jobs.c.state, jobs.c.attempts).where(jobs.c.id.in_(given_back))).all()
    assert rows and all(r.state == "queued" and r.attempts == 0 for r in rows)

    before = strikes(horde, a.worker.id)
    assert a.ask([MODEL_B], as_worker=b.worker.name, seconds=3) is None
    wait_until(lambda: strikes(horde, a.worker.id) == before + 1, 10, "A's strike for the forged ask")
    assert offences(horde, a.worker.id)[-1].kind == "forged_ask"
    with horde.engine.connect() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.request_id.in_(requests)).values(state="cancelled"))
        conn.commit()
