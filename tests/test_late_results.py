"""A result that arrives after its lease expired: from the worker that held the job (its lease id),
it is late, not forged. Accepted and paid if nobody has taken the job since; ignored, without a
strike, if another worker has. Real API, ledger, RabbitMQ and PostgreSQL; workers driven by hand."""

from __future__ import annotations

import time

import sqlalchemy as sa

from api.tables import moderation_log, workers
from broker.messages import JobCompleted
from broker.topology import completed_key
from config import Settings
from tests.e2e import HordeClient
from tests.manual_worker import ManualWorker
from tests.processes import wait_until
from tests.test_spine_e2e import TINY, tiny_webp


def _completion(job_id: str, lease_id: str, worker: str, model: str) -> JobCompleted:
    return JobCompleted(job_id=job_id, lease_id=lease_id, worker=worker, model=model, seed="3",
                        image=tiny_webp(64, 64), width=64, height=64, generation_seconds=30.0)


def _strikes(horde: HordeClient, name: str) -> int:
    with horde.engine.connect() as conn:
        return int(conn.execute(sa.select(workers.c.strikes).where(workers.c.name == name)).scalar_one())


def _moderation_rows(horde: HordeClient, job_id: str) -> list[object]:
    with horde.engine.connect() as conn:
        return [row for row in conn.execute(sa.select(moderation_log)) if job_id in str(row.detail)]


def _expired(horde: HordeClient, request_id: str) -> None:
    """Wait for the reconciler to take the job back from its lease (HORDE_LEASE_MIN_SECONDS)."""
    wait_until(lambda: horde.job_rows(request_id)[0].attempts == 1, 40, "the lease to expire")
    assert horde.job_rows(request_id)[0].state == "queued"


def test_a_late_result_is_accepted_when_nobody_took_the_job_since(horde: HordeClient, settings: Settings) -> None:
    requester, owner = horde.user("late-requester", kudos=50), horde.user("late-owner")
    horde.register_worker("w-late", owner)
    request_id = horde.submit(requester, prompt="slow but sure", models=["tiny-late"], params=TINY)
    [job] = horde.job_rows(request_id)
    worker = ManualWorker(settings.rabbitmq_url, "w-late")
    try:
        offer = worker.take("tiny-late", job.id)
        _expired(horde, request_id)
        worker.publish(completed_key("w-late"), _completion(job.id, offer.lease_id, "w-late", "tiny-late"))
    finally:
        worker.close()
    status = horde.wait_done(request_id, timeout=30)
    assert status["generations"][0]["worker_name"] == "w-late"
    horde.wait_balance(owner, job.price / 100)
    assert len(horde.ledger_entries(job.id)) == 4
    assert _strikes(horde, "w-late") == 0 and _moderation_rows(horde, job.id) == []


def test_a_late_result_after_another_worker_took_the_job_is_ignored_without_a_strike(
        horde: HordeClient, settings: Settings) -> None:
    requester = horde.user("late-taken-requester", kudos=50)
    slow_owner, quick_owner = horde.user("late-slow-owner"), horde.user("late-quick-owner")
    horde.register_worker("w-late-slow", slow_owner)
    horde.register_worker("w-late-quick", quick_owner)
    request_id = horde.submit(requester, prompt="taken over", models=["tiny-late-taken"], params=TINY)
    [job] = horde.job_rows(request_id)
    slow = ManualWorker(settings.rabbitmq_url, "w-late-slow")
    quick = ManualWorker(settings.rabbitmq_url, "w-late-quick")
    try:
        late = slow.take("tiny-late-taken", job.id)
        _expired(horde, request_id)
        current = quick.take("tiny-late-taken", job.id)
        slow.publish(completed_key("w-late-slow"), _completion(job.id, late.lease_id, "w-late-slow", "tiny-late-taken"))
        time.sleep(1.0)  # judged by now
        assert horde.job_rows(request_id)[0].state == "claimed"
        quick.publish(completed_key("w-late-quick"),
                      _completion(job.id, current.lease_id, "w-late-quick", "tiny-late-taken"))
    finally:
        slow.close()
        quick.close()
    status = horde.wait_done(request_id, timeout=30)
    assert status["generations"][0]["worker_name"] == "w-late-quick"
    horde.wait_balance(quick_owner, job.price / 100)
    assert horde.balance(slow_owner) == 0 and len(horde.ledger_entries(job.id)) == 4
    assert _strikes(horde, "w-late-slow") == 0 and _moderation_rows(horde, job.id) == []
