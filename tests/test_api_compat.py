"""The AI Horde surface over plain HTTP: users, registration, transfers, status, workers, errors,
the HTTP worker bridge (pop/submit on the queues) and the OpenAPI document, fuzzed by schemathesis.

These tests run a horde of their own (API and ledger processes, a database and a vhost of their
own, short leases), so the fuzzer's requests and the bridge's lease expiries touch no other test.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import migrations
from api.accounts import APIKEY_LENGTH
from broker.topology import job_queue
from config import Settings
from config.models import DEFAULT_REFERENCE
from ledger.report import reconcile
from tests import services
from tests.e2e import HordeClient, User
from tests.processes import free_port, start_api, start_ledger, wait_until

MODELS = ("compat-pop", "compat-skip", "compat-abort", "compat-prio", "compat-cancel", "compat-status",
          "compat-fault", "compat-creds", "compat-race", "compat-uptime")
TINY = {"width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def compat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HordeClient]:
    database_url = services.create_database("horde_compat")
    migrations.upgrade(database_url)
    rabbitmq_url = services.create_vhost("horde-compat")
    state_dir = tmp_path_factory.mktemp("compat-state")
    specs = json.loads(DEFAULT_REFERENCE.read_text())
    specs += [{"name": name, "kind": "image", "baseline": "stable_diffusion_1"} for name in MODELS]
    specs += [{"name": "compat-text", "kind": "text", "baseline": "gpt2", "parameters_b": 0.1}]
    reference = state_dir / "models.json"
    reference.write_text(json.dumps(specs))
    settings = Settings(database_url=database_url, rabbitmq_url=rabbitmq_url, state_dir=state_dir,
                        model_reference=reference, api_port=free_port(), lease_base_seconds=1.0,
                        lease_step_seconds=0.01, lease_min_seconds=3.0, reconcile_interval_seconds=0.5,
                        republish_after_seconds=3.0, aging_seconds=0, uptime_interval_seconds=1.0,
                        uptime_stale_seconds=60.0)
    api, ledger = start_api(settings), start_ledger(settings)
    client = HordeClient(settings)
    try:
        yield client
        with client.engine.connect() as conn:
            assert reconcile(conn) == []
    finally:
        client.close()
        ledger.stop()
        api.stop()
        services.drop_database(database_url)
        services.delete_vhost(rabbitmq_url)


def png(width: int = 64, height: int = 64) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (250, 120, 10)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def pop(horde: HordeClient, user: User, name: str, models: list[str], **offer: Any) -> httpx.Response:
    return horde.http.post("/api/v2/generate/pop", headers={"apikey": user.apikey},
                           json={"name": name, "models": models, "max_pixels": 262144, **offer})


def submit(horde: HordeClient, user: User, job_id: str, **body: Any) -> httpx.Response:
    return horde.http.post("/api/v2/generate/submit", headers={"apikey": user.apikey},
                           json={"id": job_id, "generation": png(), "state": "ok", "seed": 42, **body})


def job_state(horde: HordeClient, request_id: str) -> str:
    return horde.job_rows(request_id)[0].state


# --- errors, headers, documents ------------------------------------------------------------------


def test_errors_are_json_with_message_and_rc(compat: HordeClient) -> None:
    for response, status, rc in [
        (compat.http.get("/api/v2/no/such/route"), 404, "NotFound"),
        (compat.http.delete("/api/v2/find_user"), 405, "MethodNotAllowed"),
        (compat.http.get("/api/v2/users/not-a-number"), 400, "BadRequest"),
        (compat.http.get("/api/v2/users/999999"), 404, "UserNotFound"),
        (compat.http.get("/api/v2/users/99999999999999"), 400, "BadRequest"),
        (compat.http.get("/api/v2/workers/name/a%00b"), 404, "WorkerNotFound"),
        (compat.http.get("/api/v2/workers/999999"), 404, "WorkerNotFound"),
        (compat.http.get("/api/v2/generate/check/not-a-uuid"), 404, "RequestNotFound"),
        (compat.http.post("/api/v2/kudos/transfer", content=b"{", headers={"Content-Type": "application/json"}),
         400, "BadRequest"),
        (compat.http.get("/api/v2/find_user", headers={"apikey": "y" * 22}), 404, "UserNotFound"),
    ]:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["rc"] == rc and isinstance(body["message"], str) and body["message"]


def test_an_unexpected_failure_is_a_json_500() -> None:
    from api.app import _install_error_handlers

    app = FastAPI()
    _install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500 and response.json()["rc"] == "InternalServerError"


def test_both_client_agent_header_spellings_are_accepted(compat: HordeClient) -> None:
    for header in ("Client-Agent", "client_agent"):
        response = compat.http.post("/api/v2/generate/async", headers={header: "my-ui:1.0:me@example.com"},
                                    json={"prompt": "x", "models": ["compat-pop"], "params": TINY, "dry_run": True})
        assert response.status_code == 200 and response.json()["kudos"] > 0


def test_openapi_document_is_served_and_says_what_the_server_does(compat: HordeClient) -> None:
    document = compat.http.get("/openapi.json").json()
    assert compat.http.get("/api/swagger.json").json() == document
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "default" in operation["responses"], (method, path)
    for path in ("/api/v2/find_user", "/api/v2/users", "/api/v2/kudos/transfer", "/api/v2/status/models",
                 "/api/v2/workers", "/api/v2/generate/pop", "/api/v2/generate/submit", "/api/v2/register"):
        assert path in document["paths"], path


# --- users ---------------------------------------------------------------------------------------


def test_registration_gives_a_22_character_key_that_works(compat: HordeClient) -> None:
    response = compat.http.post("/api/v2/register", json={"username": "newcomer"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert len(created["apikey"]) == APIKEY_LENGTH and created["apikey"].isalnum()
    assert created["username"] == f"newcomer#{created['id']}"
    me = compat.http.get("/api/v2/find_user", headers={"apikey": created["apikey"]}).json()
    assert me["id"] == created["id"] and me["username"] == created["username"] and me["kudos"] == 0
    assert me["worker_ids"] == [] and me["pseudonymous"] is True and isinstance(me["account_age"], int)
    for bad in ("", "   ", "has#hash", "x" * 101):
        assert compat.http.post("/api/v2/register", json={"username": bad}).status_code == 400


def test_registration_can_be_closed() -> None:
    from types import SimpleNamespace

    from api import users
    from api.app import _install_error_handlers

    app = FastAPI()
    _install_error_handlers(app)
    app.include_router(users.router)
    app.state.horde = SimpleNamespace(settings=Settings(registration_open=False))
    response = TestClient(app).post("/api/v2/register", json={"username": "late"})
    assert response.status_code == 403 and response.json()["rc"] == "RegistrationClosed"


def test_find_user_and_users_show_kudos_details_records_and_workers(compat: HordeClient) -> None:
    user = compat.user("detailed", kudos=75)
    compat.register_worker("w-detailed", user)
    me = compat.http.get("/api/v2/find_user", headers={"apikey": user.apikey}).json()
    assert me["kudos"] == 75 and me["kudos_details"]["admin"] == 75 and me["worker_count"] == 1
    assert me["worker_ids"] == [str(w) for w in me["worker_ids"]] and len(me["worker_ids"]) == 1
    assert set(me["records"]) >= {"usage", "contribution", "fulfillment", "request"}
    public = compat.http.get(f"/api/v2/users/{user.id}").json()
    assert public["username"] == me["username"] and "worker_ids" not in public
    own = compat.http.get(f"/api/v2/users/{user.id}", headers={"apikey": user.apikey}).json()
    assert own["worker_ids"] == me["worker_ids"]
    anonymous = compat.http.get("/api/v2/find_user").json()
    assert anonymous["id"] == 0 and anonymous["username"] == "Anonymous#0"


def test_leaderboard_pages_by_kudos_and_by_age(compat: HordeClient) -> None:
    rich = compat.user("leader", kudos=9_999_999)
    first = compat.http.get("/api/v2/users", params={"page": 1}).json()
    assert first[0]["id"] == rich.id and len(first) <= 25
    kudos = [u["kudos"] for u in first]
    assert kudos == sorted(kudos, reverse=True)
    oldest = compat.http.get("/api/v2/users", params={"sort": "age"}).json()
    assert oldest[0]["id"] == 0  # the anonymous account is the first one
    assert compat.http.get("/api/v2/users", params={"page": 1000}).json() == []
    assert compat.http.get("/api/v2/users", params={"sort": "name"}).status_code == 400


# --- kudos transfers -----------------------------------------------------------------------------


def transfer(horde: HordeClient, sender: User | None, username: str, amount: Any, **headers: str) -> httpx.Response:
    return horde.http.post("/api/v2/kudos/transfer", json={"username": username, "amount": amount},
                           headers={"apikey": sender.apikey if sender else "0000000000", **headers})


def test_transfer_moves_kudos_and_shows_in_details(compat: HordeClient) -> None:
    giver, taker = compat.user("giver", kudos=100), compat.user("taker")
    response = transfer(compat, giver, taker.account.username, 30)
    assert response.status_code == 200 and response.json() == {"transferred": 30}
    assert compat.balance(giver) == 70 and compat.balance(taker) == 30
    details = compat.http.get("/api/v2/find_user", headers={"apikey": giver.apikey}).json()["kudos_details"]
    assert details["gifted"] == -30
    details = compat.http.get("/api/v2/find_user", headers={"apikey": taker.apikey}).json()["kudos_details"]
    assert details["received"] == 30


def test_transfer_with_an_idempotency_key_counts_once(compat: HordeClient) -> None:
    giver, taker = compat.user("retrier", kudos=10), compat.user("retried")
    for _ in range(3):
        response = transfer(compat, giver, taker.account.username, 4, **{"Idempotency-Key": "abc"})
        assert response.status_code == 200 and response.json()["transferred"] == 4
    assert compat.balance(giver) == 6 and compat.balance(taker) == 4


@pytest.mark.parametrize("case, rc", [
    ("self", "KudosTransferToSelf"),
    ("anonymous sender", "KudosTransferFromAnon"),
    ("to anonymous", "KudosTransferToAnon"),
    ("zero", "InvalidKudosTransferAmount"),
    ("negative", "NegativeKudosTransfer"),
    ("unknown user", "InvalidTargetUsername"),
    ("no hash", "InvalidTargetUsername"),
    ("wrong alias", "InvalidTargetUsername"),
    ("id out of range", "InvalidTargetUsername"),
    ("more than owned", "KudosTransferNotEnough"),
])
def test_refused_transfers_move_nothing(compat: HordeClient, case: str, rc: str) -> None:
    giver, taker = compat.user(f"g-{uuid.uuid4().hex[:6]}", kudos=20), compat.user(f"t-{uuid.uuid4().hex[:6]}")
    target, amount, sender = taker.account.username, 5, giver
    if case == "self":
        target = giver.account.username
    elif case == "anonymous sender":
        sender = None
    elif case == "to anonymous":
        target = "Anonymous#0"
    elif case == "zero":
        amount = 0
    elif case == "negative":
        amount = -5
    elif case == "unknown user":
        target = "nobody#99999"
    elif case == "no hash":
        target = taker.account.alias
    elif case == "wrong alias":
        target = f"someone-else#{taker.id}"
    elif case == "id out of range":
        target = f"{taker.account.alias}#99999999999999"
    elif case == "more than owned":
        amount = 20.01
    response = transfer(compat, sender, target, amount)
    assert response.status_code == 400, response.text
    assert response.json()["rc"] == rc
    assert compat.balance(giver) == 20 and compat.balance(taker) == 0


def test_transfer_with_an_unknown_key_is_401(compat: HordeClient) -> None:
    taker = compat.user("taker-401")
    response = compat.http.post("/api/v2/kudos/transfer", json={"username": taker.account.username, "amount": 1},
                                headers={"apikey": "z" * 22})
    assert response.status_code == 401 and response.json()["rc"] == "InvalidAPIKey"


# --- HTTP workers: pop and submit ----------------------------------------------------------------


def test_anonymous_workers_are_refused(compat: HordeClient) -> None:
    response = compat.http.post("/api/v2/generate/pop", json={"name": "anon", "models": ["compat-pop"]},
                                headers={"apikey": "0000000000"})
    assert response.status_code == 403 and response.json()["rc"] == "AnonForbiddenWorker"
    response = compat.http.post("/api/v2/generate/submit", json={"id": str(uuid.uuid4()), "generation": png()})
    assert response.status_code == 403 and response.json()["rc"] == "AnonForbiddenWorker"


def test_an_empty_pop_has_ai_hordes_shape(compat: HordeClient) -> None:
    owner = compat.user("idle-owner")
    response = pop(compat, owner, "Idle Worker", ["compat-pop"])
    assert response.status_code == 200
    assert response.json() == {"id": None, "ids": [], "payload": {}, "skipped": {}}


def test_pop_and_submit_complete_a_job_and_the_ledger_pays_the_owner(compat: HordeClient) -> None:
    requester, owner = compat.user("bridge-requester", kudos=50), compat.user("bridge-owner")
    request_id = compat.submit(requester, prompt="a red fox ### blurry", models=["compat-pop"],
                               params={**TINY, "height": 128, "seed": "4321", "sampler_name": "k_euler"})
    popped = pop(compat, owner, "My HTTP Worker", ["compat-pop", "unknown-model"]).json()
    [job] = compat.job_rows(request_id)
    assert popped["id"] == job.id and popped["ids"] == [job.id] and popped["model"] == "compat-pop"
    payload = popped["payload"]
    assert payload["prompt"] == "a red fox ### blurry" and payload["seed"] == "4321"
    assert (payload["width"], payload["height"], payload["ddim_steps"], payload["n_iter"]) == (64, 128, 4, 1)
    assert payload["sampler_name"] == "k_euler" and payload["karras"] is True and 0 < popped["ttl"] <= 3
    assert job_state(compat, request_id) == "claimed"
    assert services.queue_depth(compat.settings.rabbitmq_url, job_queue("compat-pop")) == 0  # acked
    response = submit(compat, owner, job.id, generation=png(64, 128), seed=4321)
    assert response.status_code == 200 and response.json() == {"reward": job.price / 100}
    status = compat.wait_done(request_id)
    [generation] = status["generations"]
    image = Image.open(io.BytesIO(base64.b64decode(generation["img"])))
    assert image.format == "WEBP" and image.size == (64, 128)  # PNG in, WebP stored
    assert generation["worker_name"] == "My HTTP Worker" and generation["seed"] == "4321"
    compat.wait_balance(owner, job.price / 100)
    assert submit(compat, owner, job.id).json()["rc"] == "DuplicateGen"
    worker_ids = compat.http.get("/api/v2/find_user", headers={"apikey": owner.apikey}).json()["worker_ids"]
    listed = compat.http.get(f"/api/v2/workers/{worker_ids[0]}", headers={"apikey": owner.apikey}).json()
    assert listed["name"] == "My HTTP Worker" and listed["online"] and listed["requests_fulfilled"] == 1
    assert listed["owner"] == owner.account.username and listed["models"] == ["compat-pop", "unknown-model"]


def test_polling_is_uptime_and_pays_the_owner(compat: HordeClient) -> None:
    owner = compat.user("uptime-owner")
    assert pop(compat, owner, "steady-worker", ["compat-uptime"], threads=1).status_code == 200  # streak starts
    time.sleep(1.2)
    assert pop(compat, owner, "steady-worker", ["compat-uptime"], threads=2).status_code == 200  # (not throttled)
    wait_until(lambda: compat.balance(owner) > 0, 10, "the uptime reward")
    worker = compat.http.get("/api/v2/workers/name/steady-worker").json()
    assert worker["online"] and worker["threads"] == 2 and worker["uptime"] >= 1


def test_jobs_a_worker_cannot_take_are_skipped_and_left_for_others(compat: HordeClient) -> None:
    requester = compat.user("skip-requester", kudos=50)
    small, big = compat.user("small-owner"), compat.user("big-owner")
    large = compat.submit(requester, prompt="large", models=["compat-skip"],
                          params={"width": 512, "height": 512, "steps": 4})
    risky = compat.submit(requester, prompt="risky", models=["compat-skip"], params=TINY, nsfw=True)
    popped = pop(compat, small, "small-gpu", ["compat-skip"], max_pixels=256 * 256, nsfw=False).json()
    assert popped["id"] is None and popped["skipped"] == {"max_pixels": 1, "nsfw": 1}
    assert services.queue_depth(compat.settings.rabbitmq_url, job_queue("compat-skip")) == 2  # requeued
    assert job_state(compat, large) == job_state(compat, risky) == "queued"
    taken = {pop(compat, big, "big-gpu", ["compat-skip"]).json()["id"] for _ in range(2)}
    assert taken == {compat.job_rows(large)[0].id, compat.job_rows(risky)[0].id}


def test_a_worker_name_of_another_user_is_refused(compat: HordeClient) -> None:
    alice, mallory = compat.user("name-owner"), compat.user("name-thief")
    assert pop(compat, alice, "Taken Name", ["compat-creds"]).status_code == 200
    response = pop(compat, mallory, "Taken Name", ["compat-creds"])
    assert response.status_code == 403 and response.json()["rc"] == "WrongCredentials"
    requester = compat.user("creds-requester", kudos=10)
    request_id = compat.submit(requester, prompt="mine", models=["compat-creds"], params=TINY)
    job_id = pop(compat, alice, "Taken Name", ["compat-creds"]).json()["id"]
    assert job_id == compat.job_rows(request_id)[0].id
    response = submit(compat, mallory, job_id)
    assert response.status_code == 403 and response.json()["rc"] == "WrongCredentials"
    response = submit(compat, alice, str(uuid.uuid4()))
    assert response.status_code == 404 and response.json()["rc"] == "InvalidJobID"
    response = submit(compat, alice, job_id, generation="not an image")
    assert response.status_code == 400
    assert submit(compat, alice, job_id).status_code == 200


def test_a_result_after_the_lease_expired_is_aborted_and_the_job_is_redone(compat: HordeClient) -> None:
    requester, owner = compat.user("abort-requester", kudos=20), compat.user("abort-owner")
    request_id = compat.submit(requester, prompt="slowly", models=["compat-abort"], params=TINY)
    job_id = pop(compat, owner, "slow-worker", ["compat-abort"]).json()["id"]
    wait_until(lambda: job_state(compat, request_id) == "queued", 20, "the reconciler to take the lease back")
    response = submit(compat, owner, job_id)
    assert response.status_code == 400 and response.json()["rc"] == "AbortedGen"
    assert pop(compat, owner, "slow-worker", ["compat-abort"]).json()["id"] == job_id  # republished
    assert submit(compat, owner, job_id).status_code == 200
    status = compat.wait_done(request_id)
    assert status["restarted"] == 1 and status["finished"] == 1


def test_a_faulted_submit_puts_the_job_back(compat: HordeClient) -> None:
    requester, owner = compat.user("fault-requester", kudos=20), compat.user("fault-owner")
    request_id = compat.submit(requester, prompt="oops", models=["compat-fault"], params=TINY)
    job_id = pop(compat, owner, "flaky", ["compat-fault"]).json()["id"]
    response = submit(compat, owner, job_id, state="faulted", generation="Faulted")
    assert response.status_code == 200 and response.json() == {"reward": 0}
    assert job_state(compat, request_id) == "queued"
    wait_until(lambda: pop(compat, owner, "flaky", ["compat-fault"]).json()["id"] == job_id, 10, "the job again")
    assert submit(compat, owner, job_id).status_code == 200


def test_pops_follow_the_queues_priority(compat: HordeClient) -> None:
    poor, rich, owner = compat.user("poor"), compat.user("rich", kudos=200_000), compat.user("prio-owner")
    poor_ids = [compat.submit(poor, prompt=f"poor {i}", models=["compat-prio"], params=TINY) for i in range(2)]
    rich_ids = [compat.submit(rich, prompt=f"rich {i}", models=["compat-prio"], params=TINY) for i in range(2)]
    order = [pop(compat, owner, "prio-worker", ["compat-prio"]).json()["id"] for _ in range(4)]
    job_ids = {rid: compat.job_rows(rid)[0].id for rid in poor_ids + rich_ids}
    assert set(order[:2]) == {job_ids[r] for r in rich_ids} and set(order[2:]) == {job_ids[r] for r in poor_ids}
    for job_id in order:
        assert submit(compat, owner, job_id).status_code == 200


def test_concurrent_pops_never_hand_out_a_job_twice(compat: HordeClient) -> None:
    requester = compat.user("race-requester", kudos=20)
    owners = [compat.user(f"race-owner-{i}") for i in range(8)]
    request_ids = [compat.submit(requester, prompt=f"race {i}", models=["compat-race"], params=TINY) for i in range(3)]
    with ThreadPoolExecutor(len(owners)) as pool:
        answers = list(pool.map(lambda o: pop(compat, o, f"racer-{o.id}", ["compat-race"]).json(), owners))
    taken = [a["id"] for a in answers if a["id"] is not None]
    assert sorted(taken) == sorted(compat.job_rows(r)[0].id for r in request_ids)  # each once, none lost
    assert services.queue_depth(compat.settings.rabbitmq_url, job_queue("compat-race")) == 0
    holders = {answer["id"]: owner for answer, owner in zip(answers, owners, strict=True) if answer["id"]}
    for job_id, owner in holders.items():
        assert submit(compat, owner, job_id).status_code == 200


def test_cancelled_jobs_are_dropped_not_served(compat: HordeClient) -> None:
    requester, owner = compat.user("cancel-requester", kudos=10), compat.user("cancel-owner")
    request_id = compat.submit(requester, prompt="never mind", models=["compat-cancel"], params=TINY)
    assert compat.http.delete(f"/api/v2/generate/status/{request_id}").json()["done"]
    assert pop(compat, owner, "cancel-worker", ["compat-cancel"]).json()["id"] is None
    assert services.queue_depth(compat.settings.rabbitmq_url, job_queue("compat-cancel")) == 0


def test_text_pop_and_submit_complete_a_text_job(compat: HordeClient) -> None:
    requester, owner = compat.user("text-requester", kudos=50), compat.user("text-owner")
    response = compat.http.post("/api/v2/generate/text/async", headers={"apikey": requester.apikey}, json={
        "prompt": "Once upon a time", "models": ["compat-text"],
        "params": {"max_length": 40, "max_context_length": 512, "temperature": 0.5, "stop_sequence": ["END"]}})
    assert response.status_code == 202, response.text
    request_id = response.json()["id"]
    text_pop = {"name": "Kobold Worker", "models": ["compat-text"], "max_length": 32}
    popped = compat.http.post("/api/v2/generate/text/pop", json=text_pop, headers={"apikey": owner.apikey}).json()
    assert popped == {"id": None, "ids": [], "payload": {}, "skipped": {"max_length": 1}}
    popped = compat.http.post("/api/v2/generate/text/pop", json={**text_pop, "max_length": 512},
                              headers={"apikey": owner.apikey}).json()
    [job] = compat.job_rows(request_id)
    assert popped["id"] == job.id and popped["model"] == "compat-text" and popped["ttl"] > 0
    payload = popped["payload"]
    assert payload["prompt"] == "Once upon a time" and payload["max_length"] == 40 and payload["n"] == 1
    assert payload["max_context_length"] == 512 and payload["stop_sequence"] == ["END"]
    image_submit = submit(compat, owner, job.id)
    assert image_submit.status_code == 404 and image_submit.json()["rc"] == "InvalidJobID"  # not an image job
    response = compat.http.post("/api/v2/generate/text/submit", headers={"apikey": owner.apikey},
                                json={"id": job.id, "generation": " there was a horde.", "state": "ok"})
    assert response.status_code == 200, response.text
    reward = response.json()["reward"]
    assert 0 < reward <= job.price / 100
    status = compat.http.get(f"/api/v2/generate/text/status/{request_id}").json()
    assert status["done"] and status["generations"][0]["text"] == " there was a horde."
    assert status["generations"][0]["worker_name"] == "Kobold Worker"
    compat.wait_balance(owner, reward)
    again = compat.http.post("/api/v2/generate/text/submit", headers={"apikey": owner.apikey},
                             json={"id": job.id, "generation": "twice", "state": "ok"})
    assert again.status_code == 400 and again.json()["rc"] == "DuplicateGen"
    workers = compat.http.get("/api/v2/workers", params={"type": "text"}).json()
    assert [w["name"] for w in workers] == ["Kobold Worker"] and workers[0]["type"] == "text"


# --- status and workers --------------------------------------------------------------------------


def test_status_models_counts_workers_and_queued_jobs(compat: HordeClient) -> None:
    requester, owner = compat.user("status-requester", kudos=10), compat.user("status-owner")
    for _ in range(2):
        compat.submit(requester, prompt="wait", models=["compat-status"], params={"width": 512, "height": 512,
                                                                                  "steps": 10})
    assert pop(compat, owner, "status-worker", ["compat-status"], max_pixels=64 * 64).json()["id"] is None

    def stats() -> dict[str, Any]:
        return {m["name"]: m for m in compat.http.get("/api/v2/status/models").json()}

    wait_until(lambda: stats()["compat-status"]["count"] == 1, 10, "the HTTP worker to count")
    model = stats()["compat-status"]
    assert model["jobs"] == 2 and model["queued"] == pytest.approx(2 * 512 * 512 * 10 / 1e6, abs=0.01)
    assert model["type"] == "image" and isinstance(model["eta"], int) and model["eta"] > 0
    text = compat.http.get("/api/v2/status/models", params={"type": "text"}).json()
    assert text and {m["type"] for m in text} == {"text"}
    busy = compat.http.get("/api/v2/status/models", params={"min_count": 1}).json()
    assert "compat-status" in {m["name"] for m in busy} and all(m["count"] >= 1 for m in busy)
    idle = compat.http.get("/api/v2/status/models", params={"max_count": 0}).json()
    assert "compat-status" not in {m["name"] for m in idle}
    assert compat.http.get("/api/v2/status/models/compat-status").json()[0]["jobs"] == 2
    assert compat.http.get("/api/v2/status/models/nothing-like-it").json() == []
    performance = compat.http.get("/api/v2/status/performance").json()
    assert performance["queued_requests"] >= 2 and performance["worker_count"] >= 1
    workers = compat.http.get("/api/v2/workers").json()
    assert "status-worker" in {w["name"] for w in workers} and all(w["online"] for w in workers)
    named = compat.http.get("/api/v2/workers", params={"name": "STATUS-WORKER"}).json()
    assert [w["name"] for w in named] == ["status-worker"] and "owner" not in named[0]
    by_name = compat.http.get("/api/v2/workers/name/status-worker").json()
    assert by_name["name"] == "status-worker" and by_name["max_pixels"] == 64 * 64


# --- the OpenAPI document, fuzzed ----------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(compat: HordeClient,
                                                                            tmp_path: Path) -> None:
    """Every operation of the served document, with examples, boundary values and random data (valid and
    invalid): never a 5xx, and every answer's status, content type and body are the documented ones."""
    base = f"http://{compat.settings.api_host}:{compat.settings.api_port}"
    fuzzer = compat.user("fuzzer", kudos=1_000)  # its key gets past authentication, to the logic behind
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    # One worker: with threads, CPython 3.11.7's ast.parse (used by hypothesis) can fail at random (gh-106905).
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "--no-color", "run", f"{base}/openapi.json", "--checks", checks,
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "25", "--seed", "4", "--workers", "1",
         "--request-timeout", "20", "--suppress-health-check", "all", "--generation-database", "none",
         "--header", f"apikey: {fuzzer.apikey}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    (tmp_path / "schemathesis.log").write_text(proc.stdout + proc.stderr)
    starts = [i for i in (proc.stdout.find("=== ERRORS"), proc.stdout.find("=== FAILURES")) if i >= 0]
    problems = proc.stdout[min(starts, default=0):]
    assert proc.returncode == 0, problems[:12000] + proc.stderr[-3000:]
