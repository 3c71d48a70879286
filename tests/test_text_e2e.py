"""Text jobs end to end, with real processes: API, ledger, a worker serving the tiny GPT-2.

submit (/v2/generate/text/async) -> the model's priority queue -> the worker claims and generates
-> completion event with the text -> stored -> settled once, on the text returned.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.topology import job_queue
from config import Settings
from ledger.pricing import billed_tokens, horde_tax, text_kudos
from ledger.tables import BURN_ACCOUNT
from tests import services
from tests.e2e import HordeClient, User
from tests.processes import start_worker

TEXT = "/api/v2/generate/text"
GENERATION_FIELDS = {"text", "seed", "id", "model", "state", "worker_id", "worker_name", "gen_metadata"}
CHECK_FIELDS = {"finished", "processing", "restarted", "waiting", "done", "faulted", "wait_time", "queue_position",
                "kudos", "is_possible"}


def submit_text(horde: HordeClient, user: User | None, **body: Any) -> dict[str, Any]:
    response = horde.http.post(f"{TEXT}/async", json=body, headers={"apikey": user.apikey if user else "0000000000"})
    assert response.status_code == 202, response.text
    return response.json()


def wait_text_done(horde: HordeClient, request_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = horde.http.get(f"{TEXT}/status/{request_id}")
        assert response.status_code == 200, response.text
        status = response.json()
        if status["done"] or status["faulted"]:
            return status
        time.sleep(0.2)
    raise AssertionError(f"text request {request_id} not done after {timeout}s: {status}")


@pytest.fixture(scope="module")
def text_worker(horde: HordeClient, settings: Settings, models_dir) -> Iterator[User]:
    """One worker, ``w-text``, serving the text test models; yields its owner."""
    owner = horde.user("text-gpu-owner")
    horde.register_worker("w-text", owner)
    worker = start_worker(settings, "w-text", ["tiny-text-e2e", "tiny-text-n"], models_dir)
    yield owner
    assert worker.stop() == 0


def test_a_text_job_runs_end_to_end_and_is_settled_once_on_the_text_returned(
        horde: HordeClient, text_worker: User) -> None:
    requester = horde.user("novelist", kudos=100)
    owner = text_worker
    params = {"max_length": 40, "max_context_length": 1024, "temperature": 0.8, "top_p": 0.9, "top_k": 50,
              "rep_pen": 1.1, "seed": 42}
    accepted = submit_text(horde, requester, prompt="The lighthouse keeper said", models=["tiny-text-e2e"],
                           params=params)
    status = wait_text_done(horde, accepted["id"])
    quote = text_kudos(tokens=40, parameters_b=13.0, max_context_length=1024)
    assert set(accepted) == {"id", "kudos"} and accepted["kudos"] == quote
    assert CHECK_FIELDS <= set(status) and status["done"] and status["finished"] == 1 and not status["faulted"]
    [generation] = status["generations"]
    assert set(generation) == GENERATION_FIELDS
    assert isinstance(generation["text"], str) and generation["text"]
    assert generation["seed"] == 42 and generation["state"] == "ok"
    assert generation["model"] == "tiny-text-e2e" and generation["worker_name"] == "w-text"
    assert generation["worker_id"].isdecimal()
    # Settled on what came back: at most the quote, exactly what the formula gives for the text.
    price = text_kudos(tokens=billed_tokens(text=generation["text"], max_length=40), parameters_b=13.0,
                       max_context_length=1024)
    assert price <= quote and status["kudos"] == price
    horde.wait_balance(owner, price)
    tax = horde_tax(price)
    assert horde.balance(requester) == pytest.approx(100 - price - tax)
    [job] = horde.job_rows(accepted["id"])
    assert job.kind == "text" and job.price == round(price * 100)
    movements = {(e.account_id, e.kind): e.amount for e in horde.ledger_entries(job.id)}
    assert movements == {
        (requester.id, "generation"): -round(price * 100), (owner.id, "generation"): round(price * 100),
        (requester.id, "tax"): -round(tax * 100), (BURN_ACCOUNT, "tax"): round(tax * 100),
    }


@pytest.mark.usefixtures("text_worker")
def test_n_texts_are_n_jobs_with_consecutive_seeds(horde: HordeClient) -> None:
    accepted = submit_text(horde, None, prompt="Once", models=["tiny-text-n"],
                           params={"n": 2, "max_length": 5, "seed": 7})
    repeat = submit_text(horde, None, prompt="Once", models=["tiny-text-n"],
                         params={"n": 1, "max_length": 5, "sampler_seed": 7})
    status = wait_text_done(horde, accepted["id"])
    again = wait_text_done(horde, repeat["id"])
    assert status["finished"] == 2 and len(horde.job_rows(accepted["id"])) == 2
    by_seed = {g["seed"]: g["text"] for g in status["generations"]}
    assert set(by_seed) == {7, 8}
    assert all(1 <= len(text) <= 15 for text in by_seed.values())  # 5 tokens of at most 3 characters
    assert again["generations"][0]["text"] == by_seed[7]  # same worker, same seed, same text


def test_a_dry_run_quotes_without_queueing(horde: HordeClient) -> None:
    before = horde.count_jobs()
    response = horde.http.post(f"{TEXT}/async", json={"prompt": "x", "models": ["tiny-text-bad"], "dry_run": True,
                                                      "params": {"n": 3, "max_length": 100,
                                                                 "max_context_length": 2048}})
    assert response.status_code == 200
    each = text_kudos(tokens=100, parameters_b=13.0, max_context_length=2048)
    assert response.json() == {"kudos": round(each * 3, 2)}
    assert horde.count_jobs() == before


BAD_TEXT_REQUESTS = [
    ("missing prompt", {"models": ["tiny-text-bad"]}, 400, "MissingPrompt"),
    ("unknown model", {"prompt": "x", "models": ["no-such-model"]}, 400, "UnknownModel"),
    ("an image model", {"prompt": "x", "models": ["tiny-e2e"]}, 400, "UnknownModel"),
    ("max_length too long", {"prompt": "x", "models": ["tiny-text-bad"], "params": {"max_length": 513}}, 400,
     "BadRequest"),
    ("context too short", {"prompt": "x", "models": ["tiny-text-bad"], "params": {"max_context_length": 10}}, 400,
     "BadRequest"),
    ("n too large", {"prompt": "x", "models": ["tiny-text-bad"], "params": {"n": 21}}, 400, "BadRequest"),
    ("temperature negative", {"prompt": "x", "models": ["tiny-text-bad"], "params": {"temperature": -1}}, 400,
     "BadRequest"),
]


@pytest.mark.parametrize("case, body, status, rc", BAD_TEXT_REQUESTS, ids=[c[0] for c in BAD_TEXT_REQUESTS])
def test_bad_text_requests_are_refused_and_nothing_is_queued(
        horde: HordeClient, settings: Settings, case: str, body: dict, status: int, rc: str) -> None:
    before = horde.count_jobs()
    response = horde.http.post(f"{TEXT}/async", json=body)
    assert response.status_code == status, response.text
    assert response.json()["rc"] == rc
    assert horde.count_jobs() == before
    assert services.queue_depth(settings.rabbitmq_url, job_queue("tiny-text-bad")) == 0


def test_text_status_knows_only_text_requests_and_cancels(horde: HordeClient) -> None:
    assert horde.http.get(f"{TEXT}/status/not-a-uuid").status_code == 404
    image = horde.submit(None, prompt="a picture", models=["tiny-cancel"], params={"width": 64, "height": 64})
    response = horde.http.get(f"{TEXT}/status/{image}")
    assert response.status_code == 404 and response.json()["rc"] == "RequestNotFound"
    assert horde.http.delete(f"{TEXT}/status/{image}").status_code == 404
    assert horde.job_rows(image)[0].state == "queued"  # not cancelled through the text route
    horde.http.delete(f"/api/v2/generate/status/{image}")
    user = horde.user("text-canceller", kudos=50)
    accepted = submit_text(horde, user, prompt="never mind", models=["tiny-text-bad"], params={"n": 2})
    assert horde.http.get(f"/api/v2/generate/status/{accepted['id']}").status_code == 404  # not an image
    response = horde.http.delete(f"{TEXT}/status/{accepted['id']}")
    assert response.status_code == 200
    status = response.json()
    assert status["done"] and status["waiting"] == 0 and status["generations"] == []
    assert {row.state for row in horde.job_rows(accepted["id"])} == {"cancelled"}
    assert horde.balance(user) == 50
