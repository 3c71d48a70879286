"""The spine end to end, with real processes: API, ledger, workers, RabbitMQ, PostgreSQL.

submit -> kudos-priority queue -> worker claims and generates (tiny real diffusers pipeline)
-> completion event -> results stored -> ledger settles exactly once.
"""

from __future__ import annotations

import base64
import io
import time
import uuid

import pytest
from PIL import Image

from broker.messages import JobCompleted
from broker.topology import completed_key, job_queue
from config import Settings
from ledger.pricing import horde_tax
from ledger.tables import BURN_ACCOUNT
from tests import services
from tests.manual_worker import ManualWorker
from tests.e2e import HordeClient
from tests.processes import start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}


def webp(data_b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data_b64)))
    assert image.format == "WEBP"
    return image


def test_job_runs_end_to_end_and_is_settled_once(horde: HordeClient, settings: Settings, models_dir) -> None:
    requester = horde.user("alice", kudos=1000)
    owner = horde.user("gpu-owner")
    horde.register_worker("w-e2e", owner)
    worker = start_worker(settings, "w-e2e", ["tiny-e2e"], models_dir)
    try:
        response = horde.http.post("/api/v2/generate/async", headers={"apikey": requester.apikey}, json={
            "prompt": "a lighthouse ### fog", "models": ["tiny-e2e"],
            "params": {"width": 64, "height": 128, "steps": 4, "seed": "1234"}})
        assert response.status_code == 202, response.text
        accepted = response.json()
        status = horde.wait_done(accepted["id"])
    finally:
        worker.stop()
    assert status["done"] and status["finished"] == 1 and not status["faulted"]
    [generation] = status["generations"]
    assert webp(generation["img"]).size == (64, 128)
    assert generation["seed"] == "1234"
    assert generation["worker_name"] == "w-e2e" and generation["model"] == "tiny-e2e"
    assert generation["state"] == "ok" and generation["censored"] is False
    kudos = accepted["kudos"]
    assert kudos > 0 and status["kudos"] == kudos
    horde.wait_balance(owner, kudos)
    tax = horde_tax(kudos)
    assert horde.balance(requester) == pytest.approx(1000 - kudos - tax)
    [job] = horde.job_rows(accepted["id"])
    movements = {(e.account_id, e.kind): e.amount for e in horde.ledger_entries(job.id)}
    assert movements == {
        (requester.id, "generation"): -round(kudos * 100), (owner.id, "generation"): round(kudos * 100),
        (requester.id, "tax"): -round(tax * 100), (BURN_ACCOUNT, "tax"): round(tax * 100),
    }


def test_n_images_become_n_jobs(horde: HordeClient, settings: Settings, models_dir) -> None:
    owner = horde.user("owner-n")
    horde.register_worker("w-n", owner)
    worker = start_worker(settings, "w-n", ["tiny-e2e"], models_dir)
    try:
        request_id = horde.submit(None, prompt="three cats", models=["tiny-e2e"], params={**TINY, "n": 3})
        status = horde.wait_done(request_id)
    finally:
        worker.stop()
    assert status["finished"] == 3 and len(status["generations"]) == 3
    assert len({g["id"] for g in status["generations"]}) == 3
    assert len(horde.job_rows(request_id)) == 3


def test_richer_requesters_are_served_first(horde: HordeClient, settings: Settings, models_dir) -> None:
    poor = horde.user("poor")  # 0 kudos: tier 0
    rich = horde.user("rich", kudos=200_000)  # tier 4
    owner = horde.user("owner-prio")
    horde.register_worker("w-prio", owner)
    poor_ids = [horde.submit(poor, prompt=f"poor {i}", models=["tiny-prio"], params=TINY) for i in range(3)]
    rich_ids = [horde.submit(rich, prompt=f"rich {i}", models=["tiny-prio"], params=TINY) for i in range(3)]
    worker = start_worker(settings, "w-prio", ["tiny-prio"], models_dir)
    try:
        for request_id in poor_ids + rich_ids:
            horde.wait_done(request_id)
    finally:
        worker.stop()
    finished = {rid: horde.job_rows(rid)[0].finished_at for rid in poor_ids + rich_ids}
    last_rich = max(finished[r] for r in rich_ids)
    first_poor = min(finished[r] for r in poor_ids)
    assert last_rich < first_poor, finished


def test_killed_worker_job_is_redone_by_another_and_settled_once(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    requester = horde.user("patient", kudos=500)
    owner1, owner2 = horde.user("owner-dies"), horde.user("owner-lives")
    horde.register_worker("w-dies", owner1)
    horde.register_worker("w-lives", owner2)
    doomed = start_worker(settings, "w-dies", ["tiny-kill"], models_dir)
    # Enough steps that generation is still running when the worker is killed.
    request_id = horde.submit(requester, prompt="slow", models=["tiny-kill"],
                              params={"width": 64, "height": 64, "steps": 400})
    wait_until(lambda: horde.job_rows(request_id)[0].state == "claimed", 30, "the job to be claimed", doomed)
    time.sleep(0.5)
    doomed.kill()
    survivor = start_worker(settings, "w-lives", ["tiny-kill"], models_dir)
    try:
        status = horde.wait_done(request_id, timeout=120)
    finally:
        survivor.stop()
    [generation] = status["generations"]
    assert generation["worker_name"] == "w-lives"
    assert status["restarted"] >= 1
    [job] = horde.job_rows(request_id)
    price = job.price / 100
    horde.wait_balance(owner2, price)
    assert horde.balance(owner1) == 0
    assert horde.balance(requester) == pytest.approx(500 - price - horde_tax(price))
    assert len(horde.ledger_entries(job.id)) == 4


def tiny_webp(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 20)).save(out, format="WEBP")
    return out.getvalue()


def test_duplicate_completion_is_settled_once(horde: HordeClient, settings: Settings) -> None:
    requester = horde.user("dup-requester", kudos=100)
    owner = horde.user("dup-owner")
    horde.register_worker("w-dup", owner)
    request_id = horde.submit(requester, prompt="twice", models=["tiny-dup"], params=TINY)
    [job] = horde.job_rows(request_id)
    worker = ManualWorker(settings.rabbitmq_url, "w-dup")
    try:
        reply = worker.take("tiny-dup", job.id)
        again = worker.claim(job.id, "tiny-dup")
        assert again is not None and not again.granted  # one lease per job
        event = JobCompleted(job_id=job.id, lease_id=reply.lease_id, worker="w-dup", model="tiny-dup", seed="7",
                             image=tiny_webp(64, 64), width=64, height=64, generation_seconds=0.1)
        worker.publish(completed_key("w-dup"), event)
        worker.publish(completed_key("w-dup"), event)  # a retry after a lost confirm, say
        worker.publish(completed_key("w-dup"), event, message_id="same-id")
        worker.publish(completed_key("w-dup"), event, message_id="same-id")
    finally:
        worker.close()
    status = horde.wait_done(request_id)
    assert status["finished"] == 1
    price = job.price / 100
    horde.wait_balance(owner, price)
    time.sleep(1.0)  # let every duplicate reach the ledger
    assert horde.balance(owner) == pytest.approx(price)
    assert horde.balance(requester) == pytest.approx(100 - price - horde_tax(price))
    assert len(horde.ledger_entries(job.id)) == 4


BAD_REQUESTS = [
    ("missing prompt", {"models": ["tiny-bad"], "params": TINY}, 400, "MissingPrompt"),
    ("empty prompt", {"prompt": "", "models": ["tiny-bad"], "params": TINY}, 400, "MissingPrompt"),
    ("width not a multiple of 64", {"prompt": "x", "models": ["tiny-bad"], "params": {**TINY, "width": 100}},
     400, "BadRequest"),
    ("unknown model", {"prompt": "x", "models": ["no-such-model"], "params": TINY}, 400, "UnknownModel"),
    ("steps out of range", {"prompt": "x", "models": ["tiny-bad"], "params": {**TINY, "steps": 501}},
     400, "BadRequest"),
    ("zero steps", {"prompt": "x", "models": ["tiny-bad"], "params": {**TINY, "steps": 0}}, 400, "BadRequest"),
    ("unknown sampler", {"prompt": "x", "models": ["tiny-bad"], "params": {**TINY, "sampler_name": "nope"}},
     400, "BadRequest"),
    ("prompt not a string", {"prompt": 5, "models": ["tiny-bad"]}, 400, "BadRequest"),
    ("n too large", {"prompt": "x", "models": ["tiny-bad"], "params": {**TINY, "n": 21}}, 400, "BadRequest"),
]


@pytest.mark.parametrize("case, body, status, rc", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_refused_and_nothing_is_queued_or_charged(
        horde: HordeClient, settings: Settings, case: str, body: dict, status: int, rc: str) -> None:
    user = horde.user(f"careless-{uuid.uuid4().hex[:6]}", kudos=50)
    before = horde.count_jobs()
    response = horde.http.post("/api/v2/generate/async", json=body, headers={"apikey": user.apikey})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["rc"] == rc and isinstance(error["message"], str) and error["message"]
    assert horde.count_jobs() == before
    assert horde.balance(user) == 50
    assert services.queue_depth(settings.rabbitmq_url, job_queue("tiny-bad")) == 0


def test_malformed_json_and_unknown_apikey_are_refused(horde: HordeClient, settings: Settings) -> None:
    before = horde.count_jobs()
    response = horde.http.post("/api/v2/generate/async", content=b'{"prompt": "x",',
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["rc"] == "BadRequest"
    response = horde.http.post("/api/v2/generate/async", json={"prompt": "x", "models": ["tiny-bad"]},
                               headers={"apikey": "not-a-real-key-000000"})
    assert response.status_code == 401 and response.json()["rc"] == "InvalidAPIKey"
    assert horde.count_jobs() == before
    assert services.queue_depth(settings.rabbitmq_url, job_queue("tiny-bad")) == 0


def test_unknown_request_and_route_answer_json_errors(horde: HordeClient) -> None:
    response = horde.http.get(f"/api/v2/generate/check/{uuid.uuid4()}")
    assert response.status_code == 404 and response.json()["rc"] == "RequestNotFound"
    response = horde.http.get("/api/v2/no/such/route")
    assert response.status_code == 404 and response.json()["rc"] == "NotFound"
    response = horde.http.put("/api/v2/generate/async", json={})
    assert response.status_code == 405 and response.json()["rc"] == "MethodNotAllowed"


def test_cancel_stops_queued_jobs_and_charges_nothing(horde: HordeClient, settings: Settings) -> None:
    user = horde.user("canceller", kudos=100)
    request_id = horde.submit(user, prompt="never mind", models=["tiny-cancel"], params={**TINY, "n": 2})
    response = horde.http.delete(f"/api/v2/generate/status/{request_id}")
    assert response.status_code == 200
    status = response.json()
    assert status["done"] and status["waiting"] == 0 and status["generations"] == []
    assert {row.state for row in horde.job_rows(request_id)} == {"cancelled"}
    assert horde.balance(user) == 100


def test_purged_jobs_are_republished_from_the_database(horde: HordeClient, settings: Settings, models_dir) -> None:
    """A job whose message vanished (here: the queue was purged) is republished and still done."""
    requester = horde.user("purged", kudos=10)
    owner = horde.user("owner-purge")
    horde.register_worker("w-purge", owner)
    request_ids = [horde.submit(requester, prompt=f"lost {i}", models=["tiny-purge"], params=TINY) for i in range(2)]
    queue = job_queue("tiny-purge")
    assert services.queue_depth(settings.rabbitmq_url, queue) == 2
    services.purge_queue(settings.rabbitmq_url, queue)
    wait_until(lambda: services.queue_depth(settings.rabbitmq_url, queue) == 2, 30,
               "the reconciler to republish the purged jobs")
    worker = start_worker(settings, "w-purge", ["tiny-purge"], models_dir)
    try:
        for request_id in request_ids:
            assert horde.wait_done(request_id)["finished"] == 1
    finally:
        worker.stop()


def test_each_cancel_endpoint_only_touches_its_own_kind(horde: HordeClient) -> None:
    text = horde.http.post("/api/v2/generate/text/async", headers={"apikey": "0000000000"},
                           json={"prompt": "once upon", "models": ["tiny-text-kind"], "params": {"max_length": 16}})
    assert text.status_code == 202, text.text
    text_id = text.json()["id"]
    wrong = horde.http.delete(f"/api/v2/generate/status/{text_id}")
    assert wrong.status_code == 404 and wrong.json()["rc"] == "RequestNotFound"
    assert {row.state for row in horde.job_rows(text_id)} == {"queued"}
    right = horde.http.delete(f"/api/v2/generate/text/status/{text_id}")
    assert right.status_code == 200 and right.json()["done"]
    assert {row.state for row in horde.job_rows(text_id)} == {"cancelled"}


def test_queue_counts_are_current(horde: HordeClient, settings: Settings, models_dir) -> None:
    """is_possible and the status counts follow the queues as they are now, not as they were at start-up."""
    request_id = horde.submit(None, prompt="anyone?", models=["tiny-live"], params=TINY)
    wait_until(lambda: not horde.http.get(f"/api/v2/generate/check/{request_id}").json()["is_possible"], 10,
               "the job to be reported impossible while no worker serves its model")
    owner = horde.user("owner-live")
    horde.register_worker("w-live", owner)
    worker = start_worker(settings, "w-live", ["tiny-live"], models_dir)
    try:
        assert horde.wait_done(request_id)["finished"] == 1
        counts = lambda: {m["name"]: m["count"] for m in horde.http.get("/api/v2/status/models").json()}  # noqa: E731
        wait_until(lambda: counts().get("tiny-live") == 1, 10, "the serving worker to be counted")
    finally:
        worker.stop()
    # Counted from heartbeats (every 5 s): a worker silent for 15 s is no longer counted.
    wait_until(lambda: {m["name"]: m["count"] for m in horde.http.get("/api/v2/status/models").json()}
               .get("tiny-live") == 0, 25, "the stopped worker to be uncounted")
