"""The dispatcher keeps consuming a model's queue for ``HORDE_DISPATCH_LINGER_SECONDS`` after the
last waiting worker was served, holding the next heads ready for the next ask, then puts them back.
Real API process, RabbitMQ, PostgreSQL; the worker is driven by hand over AMQP."""

from __future__ import annotations

import time

from broker.messages import JobCompleted, JobOffer
from broker.topology import completed_key, job_queue
from config import Settings
from tests.e2e import HordeClient
from tests.manual_worker import ManualWorker
from tests.processes import wait_until
from tests.test_spine_e2e import TINY, tiny_webp

MODEL = "tiny-linger"


def _queue(worker: ManualWorker) -> tuple[int, int]:
    """(ready messages, consumers) of the model's queue."""
    channel = worker.connection.channel()
    try:
        ok = channel.queue_declare(job_queue(MODEL), passive=True).method
        return ok.message_count, ok.consumer_count
    finally:
        channel.close()


def _finish(worker: ManualWorker, offer: JobOffer | None, job_id: str) -> None:
    """The offer is ``job_id``'s: complete it (a lease left to expire would queue it again)."""
    assert offer is not None and offer.granted and offer.job is not None and offer.lease_id is not None
    assert offer.job.job_id == job_id
    worker.publish(completed_key(worker.name), JobCompleted(
        job_id=job_id, lease_id=offer.lease_id, worker=worker.name, model=MODEL, seed="1",
        image=tiny_webp(64, 64), width=64, height=64, generation_seconds=0.1))


def test_a_served_model_stays_consumed_for_the_linger_then_its_held_jobs_go_back(
        horde: HordeClient, settings: Settings) -> None:
    assert settings.dispatch_linger_seconds == 10.0  # the default
    requester, owner = horde.user("linger-requester", kudos=50), horde.user("linger-owner")
    horde.register_worker("w-linger", owner)
    first, second = (horde.submit(requester, prompt=f"job {i}", models=[MODEL], params=TINY) for i in range(2))
    worker = ManualWorker(settings.rabbitmq_url, "w-linger")
    try:
        _finish(worker, worker.ask([MODEL]), horde.job_rows(first)[0].id)

        # Past the old one-second lingering: still consumed, the next head held, ready for the next ask.
        worker.connection.sleep(3.0)
        assert _queue(worker) == (0, 1)
        asked = time.monotonic()
        _finish(worker, worker.ask([MODEL], seconds=5), horde.job_rows(second)[0].id)
        served_at = time.monotonic()
        assert served_at - asked < 1.0  # no consume, delivery and redelivery in between

        # Nobody asks any more: after the lingering the consumer goes, and a job held meanwhile
        # goes back to its queue, in place (with the copies aging added meanwhile: HORDE_AGING_SECONDS
        # is 8 here).
        third = horde.submit(requester, prompt="job 2", models=[MODEL], params=TINY)
        wait_until(lambda: _queue(worker)[1] == 0, settings.dispatch_linger_seconds + 10,
                   "the dispatcher to let the model's queue go")
        assert _queue(worker)[0] >= 1
        assert time.monotonic() - served_at > settings.dispatch_linger_seconds - 1
        assert horde.job_rows(third)[0].state == "queued"
        _finish(worker, worker.ask([MODEL]), horde.job_rows(third)[0].id)  # and it is offered from there
    finally:
        worker.close()
    assert [horde.wait_done(r)["finished"] for r in (first, second, third)] == [1, 1, 1]
