"""At the door: a job accepted while a worker waits for it is leased with its INSERT and offered at
once, without passing through its queue; when the lease is refused it is queued as usual, and lost
neither way. Real API process, RabbitMQ, PostgreSQL; the worker is driven by hand over AMQP."""

from __future__ import annotations

import sqlalchemy as sa

from api.tables import workers
from broker.messages import JobCompleted
from broker.topology import completed_key
from config import Settings
from tests.e2e import HordeClient
from tests.manual_worker import ManualWorker
from tests.processes import wait_until
from tests.test_spine_e2e import TINY, tiny_webp


def _api_log(settings: Settings) -> str:
    return (settings.state_dir / "logs" / "api.log").read_text(errors="replace")


def _ask_and_wait_a_moment(worker: ManualWorker, model: str) -> None:
    """Leave an ask with the dispatcher and give it a moment to start consuming the model's queue."""
    worker.send_ask([model])
    worker.connection.sleep(0.5)


def test_a_waiting_worker_is_handed_a_new_job_at_the_door(horde: HordeClient, settings: Settings) -> None:
    requester, owner = horde.user("door-requester", kudos=50), horde.user("door-owner")
    horde.register_worker("w-door", owner)
    worker = ManualWorker(settings.rabbitmq_url, "w-door")
    try:
        _ask_and_wait_a_moment(worker, "tiny-door")
        request_id = horde.submit(requester, prompt="at once", models=["tiny-door"], params=TINY)
        [job] = horde.job_rows(request_id)
        # Leased in the INSERT's transaction: claimed by the time the 202 is read.
        assert job.state == "claimed" and job.lease_id is not None
        offer = worker.next_offer(10)
        assert offer is not None and offer.granted and offer.job.job_id == job.id
        assert offer.lease_id == job.lease_id and offer.model == "tiny-door"
        assert f"job {job.id}: handed to w-door at the door" in _api_log(settings)
        event = JobCompleted(job_id=job.id, lease_id=offer.lease_id, worker="w-door", model="tiny-door", seed="1",
                             image=tiny_webp(64, 64), width=64, height=64, generation_seconds=0.1)
        worker.publish(completed_key("w-door"), event)
    finally:
        worker.close()
    assert horde.wait_done(request_id)["finished"] == 1
    horde.wait_balance(owner, job.price / 100)
    assert len(horde.ledger_entries(job.id)) == 4


def test_a_worker_that_may_not_lease_leaves_the_job_queued(horde: HordeClient, settings: Settings) -> None:
    requester, owner = horde.user("door-paused-requester", kudos=50), horde.user("door-paused-owner")
    horde.register_worker("w-door-paused", owner)
    worker = ManualWorker(settings.rabbitmq_url, "w-door-paused")
    try:
        with horde.engine.begin() as conn:
            conn.execute(sa.update(workers).where(workers.c.name == "w-door-paused").values(paused=True))
        _ask_and_wait_a_moment(worker, "tiny-door-paused")
        request_id = horde.submit(requester, prompt="later", models=["tiny-door-paused"], params=TINY)
        [job] = horde.job_rows(request_id)
        assert job.state == "queued"  # the door's lease was refused in the INSERT's transaction
        not_now = worker.next_offer(10)
        assert not_now is not None and not not_now.granted  # the queued copy met the same refusal
        assert f"job {job.id}: handed" not in _api_log(settings)
        with horde.engine.begin() as conn:
            conn.execute(sa.update(workers).where(workers.c.name == "w-door-paused").values(paused=False))
        offer = worker.take("tiny-door-paused", job.id)  # from its queue: nothing was lost
        assert offer.lease_id is not None
        wait_until(lambda: horde.job_rows(request_id)[0].state == "claimed", 10, "the job leased")
    finally:
        worker.close()


def test_a_new_job_does_not_pass_older_ones_still_in_the_queue(horde: HordeClient, settings: Settings) -> None:
    """The dispatcher holds ``HORDE_DISPATCH_HOLD`` (8) heads that fit nobody waiting; a job behind
    them is still in the queue, so a new job that fits the waiting worker may not be handed over at
    the door: it goes to the queue, behind the older one."""
    requester, owner = horde.user("door-busy-requester", kudos=50), horde.user("door-busy-owner")
    horde.register_worker("w-door-busy", owner)
    big = {**TINY, "width": 128, "height": 128}
    heads = [horde.submit(requester, prompt=f"big {i}", models=["tiny-door-busy"], params=big) for i in range(8)]
    older = horde.submit(requester, prompt="small, older", models=["tiny-door-busy"], params=TINY)
    worker = ManualWorker(settings.rabbitmq_url, "w-door-busy")
    try:
        worker.send_ask(["tiny-door-busy"], max_pixels=64 * 64)  # fits only the small jobs
        worker.connection.sleep(0.5)
        newer = horde.submit(requester, prompt="small, newer", models=["tiny-door-busy"], params=TINY)
        assert worker.next_offer(1.5) is None  # the newer job was not handed over past the older one
        assert [horde.job_rows(r)[0].state for r in (*heads, older, newer)] == ["queued"] * 10
        assert "handed to w-door-busy" not in _api_log(settings)
    finally:
        worker.close()
