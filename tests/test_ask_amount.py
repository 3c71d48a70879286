"""A worker that asks for several jobs (``JobAsk.amount``) is offered up to that many in one offer,
within its lease cap, each with a lease of its own, and may send their results back in one
``jobs-completed.v1`` message. Real API process, ledger, RabbitMQ and PostgreSQL; the worker is
driven by hand over AMQP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker.messages import ImageParams, JobCompleted, JobMessage, JobOffer, JobsCompleted, OfferedJob
from broker.topology import completed_key
from config import Settings
from tests.e2e import HordeClient
from tests.manual_worker import ManualWorker
from tests.processes import wait_until
from tests.test_spine_e2e import TINY, tiny_webp

MODEL = "tiny-amount"


def _result(worker: ManualWorker, offer: JobOffer) -> JobCompleted:
    assert offer.job is not None and offer.lease_id is not None
    return JobCompleted(job_id=offer.job.job_id, lease_id=offer.lease_id, worker=worker.name, model=offer.model,
                        seed="1", image=tiny_webp(64, 64), width=64, height=64, generation_seconds=0.1)


def test_an_ask_for_several_is_offered_up_to_its_lease_cap_in_one_offer_and_completed_in_one_message(
        horde: HordeClient, settings: Settings) -> None:
    assert settings.max_leases_per_worker == 3
    requester, owner = horde.user("amount-requester", kudos=100), horde.user("amount-owner")
    horde.register_worker("w-amount", owner)
    requests = [horde.submit(requester, prompt=f"job {i}", models=[MODEL], params=TINY) for i in range(5)]
    job_ids = [horde.job_rows(r)[0].id for r in requests]  # oldest first; all of the same tier
    worker = ManualWorker(settings.rabbitmq_url, "w-amount")
    try:
        # One job first: the dispatcher starts consuming the model's queue, and keeps the next heads
        # held for the next ask (it answers an ask with what it holds, however few).
        offer = worker.ask([MODEL])
        assert offer is not None and offer.granted and offer.job is not None and offer.job.job_id == job_ids[0]
        assert offer.also == []
        worker.publish(completed_key(worker.name), _result(worker, offer))
        horde.wait_done(requests[0])

        offer = worker.ask([MODEL], amount=5)
        assert offer is not None and offer.granted
        batch = offer.leased()
        # Five asked, three given: the lease cap. The three oldest, each leased on its own.
        assert [o.job.job_id for o in batch if o.job is not None] == job_ids[1:4]
        assert len({o.lease_id for o in batch}) == 3
        rows = {row.id: row for r in requests for row in horde.job_rows(r)}
        assert [(rows[o.job.job_id].state, rows[o.job.job_id].lease_id) for o in batch if o.job is not None] == \
            [("claimed", o.lease_id) for o in batch]
        assert rows[job_ids[4]].state == "queued"
        assert worker.next_offer(seconds=1) is None  # one answer for the one ask

        worker.publish(completed_key(worker.name), JobsCompleted(completions=[_result(worker, o) for o in batch]))
        for r in requests[1:4]:
            horde.wait_done(r)
        rest = worker.ask([MODEL], amount=5)  # room again: the last one
        assert rest is not None and rest.granted and rest.job is not None and rest.also == []
        assert rest.job.job_id == job_ids[4]
        worker.publish(completed_key(worker.name), _result(worker, rest))
    finally:
        worker.close()
    assert [horde.wait_done(r)["finished"] for r in requests] == [1] * 5
    # Each settled once: a debit and a credit (and their tax entries) per job, none twice.
    wait_until(lambda: all(len(horde.ledger_entries(j)) == 4 for j in job_ids), 30, "the ledger to settle all five")
    assert all(len(horde.ledger_entries(j)) == 4 for j in job_ids)


def test_an_offer_of_several_reads_as_one_offer_per_job() -> None:
    now = datetime.now(UTC)
    job = JobMessage(job_id="a", request_id="r", kind="image", models=["m"], prompt="p", tier=1, created_at=now,
                     params=ImageParams(width=64, height=64, steps=4, cfg_scale=7, sampler_name="k_euler", karras=True))
    other = job.model_copy(update={"job_id": "b"})
    offer = JobOffer(granted=True, job=job, model="m", lease_id="la", lease_deadline=now + timedelta(minutes=1),
                     also=[OfferedJob(job=other, model="m", lease_id="lb", lease_deadline=now + timedelta(minutes=2))])
    decoded = JobOffer.model_validate_json(offer.encode())
    assert [(o.job.job_id, o.lease_id, o.also) for o in decoded.leased() if o.job is not None] == \
        [("a", "la", []), ("b", "lb", [])]
    assert JobOffer(granted=False, reason="paused").leased() == []
