"""Registered workers get their own least-privilege RabbitMQ users (issue 6), against the real broker.

Registration over HTTP, a real ``horde worker --amqp-url`` doing a real job with its own user,
revocation (connections closed, logins refused), pause and maintenance (no job; another worker
does it; back in service restores), and the registration's validation.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from PIL import Image

from api.provisioning import credentials_url, literal_regex, worker_grant
from api.roles import set_role
from api.tables import workers
from broker.topology import job_queue, worker_queue
from config import Settings
from tests import services
from tests.e2e import HordeClient, User
from tests.processes import Process, free_port, settings_env, start_api, start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}


# --- helpers: the management API as an operator sees it ------------------------------------------


def mgmt(path: str) -> Any:
    response = httpx.get(f"{services.RABBIT_MGMT}{path}", auth=services.RABBIT_ADMIN, timeout=10)
    return response.json() if response.status_code == 200 else None


def vhost(settings: Settings) -> str:
    return unquote(urlsplit(settings.rabbitmq_url).path[1:])


def connections_of(user: str) -> list[dict[str, Any]]:
    return [c for c in mgmt("/api/connections") or [] if c.get("user") == user]


def register(horde: HordeClient, owner: User | None, **body: Any) -> httpx.Response:
    return horde.http.post("/api/v2/workers", json=body,
                           headers={"apikey": owner.apikey if owner else "0000000000"})


def registered(horde: HordeClient, owner: User, name: str, models: list[str]) -> dict[str, Any]:
    response = register(horde, owner, name=name, models=models)
    assert response.status_code == 201, response.text
    return response.json()


def moderator(horde: HordeClient, alias: str) -> User:
    mod = horde.user(alias)
    with horde.engine.begin() as conn:
        set_role(conn, mod.id, "moderator", granted=True)
    return mod


# --- the pure permission set ------------------------------------------------------------------


def test_grant_is_literal_and_least_privilege() -> None:
    grant = worker_grant("gpu-1", prefix="w-", max_connections=2,
                         max_channels=8)
    assert grant.user == "w-gpu-1"
    assert (grant.configure, grant.write, grant.topic_read) == ("^$", r"^horde\.events$", "^$")
    assert grant.read == literal_regex([worker_queue("gpu-1")])
    import re

    read = re.compile(grant.read)
    assert read.match("horde.jobs.worker.gpu-1")
    # No shared queue: read would let it purge one (the dispatcher alone reads the models' queues).
    assert not read.match(job_queue("tiny-e2e")) and not read.match(job_queue("AlbedoBase XL (SDXL)"))
    assert not read.match("horde.ledger") and not read.match("horde.jobs.worker.gpu-12")
    topic = re.compile(grant.topic_write)
    for key in ("ask.gpu-1", "claim.gpu-1", "job.completed.gpu-1", "job.faulted.gpu-1", "worker.heartbeat.gpu-1"):
        assert topic.match(key), key
    for key in ("claim.gpu-2", "job.completed.gpu-1x", "job.done", "kudos.uptime", "claim.gpuX1", "claim.gpu-1.x"):
        assert not topic.match(key), key
    assert grant.paused().read == "^$" and grant.paused().topic_write == grant.topic_write
    assert credentials_url("amqp://guest:guest@broker:5672/horde-v", "w-gpu-1", "p/w@d:") == (
        "amqp://w-gpu-1:p%2Fw%40d%3A@broker:5672/horde-v")
    with pytest.raises(ValueError):
        worker_grant("Bad.Name", prefix="w-", max_connections=1, max_channels=1)
    with pytest.raises(ValueError):
        worker_grant("ok-name", prefix="W_", max_connections=1, max_channels=1)


# --- registration ----------------------------------------------------------------------------


def test_registered_worker_does_a_real_job_with_its_own_user(horde: HordeClient, settings: Settings,
                                                             models_dir) -> None:
    requester = horde.user("acct-requester", kudos=500)
    owner = horde.user("acct-owner")
    answer = registered(horde, owner, "acct-gpu", ["tiny-acct"])
    user = f"{settings.worker_user_prefix}acct-gpu"
    assert answer["amqp_user"] == user and answer["models"] == ["tiny-acct"] and answer["name"] == "acct-gpu"
    url = urlsplit(answer["amqp_url"])
    assert url.username == user and url.path == urlsplit(settings.rabbitmq_url).path
    password = unquote(url.password or "")
    assert len(password) >= 20

    # What the broker holds: the permissions, the topic permission read back, the limits.
    v = quote(vhost(settings), safe="")
    perms = mgmt(f"/api/permissions/{v}/{user}")
    assert perms["configure"] == "^$" and perms["write"] == r"^horde\.events$"
    assert perms["read"] == literal_regex([worker_queue("acct-gpu")])  # its own queue only: no shared queue
    [topic] = mgmt(f"/api/topic-permissions/{v}/{user}")
    assert topic["exchange"] == "horde.events" and topic["read"] == "^$" and "acct\\-gpu" in topic["write"]
    [limits] = mgmt(f"/api/user-limits/{user}")
    assert limits["value"] == {"max-connections": settings.worker_max_connections,
                               "max-channels": settings.worker_max_channels}
    assert mgmt(f"/api/users/{user}")["tags"] in ([], "")
    # Its own priority queue exists, with the job queues' arguments, declared by the horde.
    own = mgmt(f"/api/queues/{v}/{quote(worker_queue('acct-gpu'), safe='')}")
    assert own["arguments"] == {"x-max-priority": 4, "x-dead-letter-exchange": "horde.dlx"}
    bindings = mgmt(f"/api/queues/{v}/{quote(worker_queue('acct-gpu'), safe='')}/bindings")
    assert any(b["source"] == "horde.jobs" and b["routing_key"] == "worker.acct-gpu" for b in bindings)

    # The password is not in the database, in any column of the row.
    with horde.engine.connect() as conn:
        row = conn.execute(sa.select(workers).where(workers.c.name == "acct-gpu")).one()
    assert row.amqp_user == user and row.owner_id == owner.id and row.models == ["tiny-acct"]
    assert password not in repr(tuple(row))

    worker = start_worker(settings, "acct-gpu", ["tiny-acct"], models_dir, amqp_url=answer["amqp_url"])
    try:
        assert [c["user"] for c in wait_until(lambda: connections_of(user), 20, "the worker's connection")] == [user]
        request_id = horde.submit(requester, prompt="a red door", models=["tiny-acct"], params=TINY)
        status = horde.wait_done(request_id)
    finally:
        worker.stop()
    [generation] = status["generations"]
    assert generation["worker_name"] == "acct-gpu" and generation["worker_id"] == answer["id"]
    horde.wait_balance(owner, status["kudos"])
    assert status["kudos"] > 0


def test_registration_is_validated(horde: HordeClient, settings: Settings) -> None:
    owner = horde.user("acct-validate")
    registered(horde, owner, "acct-dup", ["tiny-acct"])
    cases = [
        (None, {"name": "acct-anon", "models": ["tiny-acct"]}, 403, "AnonForbiddenWorker"),
        (owner, {"name": "acct-dup", "models": ["tiny-acct"]}, 409, "WorkerNameTaken"),
        (owner, {"name": "Bad Name!", "models": ["tiny-acct"]}, 400, "InvalidWorkerName"),
        (owner, {"name": "acct.dot", "models": ["tiny-acct"]}, 400, "InvalidWorkerName"),
        (owner, {"name": "acct-unknown", "models": ["no-such-model"]}, 400, "UnknownModel"),
        (owner, {"name": "acct-kind", "models": ["tiny-text-e2e"]}, 400, "UnknownModel"),
        (owner, {"name": "acct-none", "models": []}, 400, "BadRequest"),
    ]
    for who, body, status, rc in cases:
        response = register(horde, who, **body)
        assert (response.status_code, response.json().get("rc")) == (status, rc), (body, response.text)
    bad_key = horde.http.post("/api/v2/workers", json={"name": "acct-key", "models": ["tiny-acct"]},
                              headers={"apikey": "not-a-key-of-anyone"})
    assert bad_key.status_code == 401
    with horde.engine.connect() as conn:
        names = set(conn.execute(sa.select(workers.c.name).where(workers.c.name.like("acct-%"))).scalars())
    assert not names & {"acct-anon", "acct-unknown", "acct-kind", "acct-none", "acct-key"}
    for name in ("acct-anon", "acct-unknown", "acct-kind", "acct-none", "acct-key"):
        assert mgmt(f"/api/users/{settings.worker_user_prefix}{name}") is None


def test_an_existing_broker_user_is_never_taken_over(horde: HordeClient, settings: Settings) -> None:
    owner = horde.user("acct-taken")
    user = f"{settings.worker_user_prefix}acct-taken"
    put = httpx.put(f"{services.RABBIT_MGMT}/api/users/{user}", json={"password": "theirs", "tags": ""},
                    auth=services.RABBIT_ADMIN, timeout=10)
    assert put.status_code == 201
    try:
        response = register(horde, owner, name="acct-taken", models=["tiny-acct"])
        assert (response.status_code, response.json()["rc"]) == (409, "WorkerNameTaken")
        with horde.engine.connect() as conn:
            assert conn.execute(sa.select(workers.c.id).where(workers.c.name == "acct-taken")).first() is None
        # Untouched: its own password still logs in.
        url = f"amqp://{user}:theirs@127.0.0.1:5672/%2F"
        with pytest.raises(pika.exceptions.ProbableAccessDeniedError):  # no vhost permission, but authenticated
            pika.BlockingConnection(pika.URLParameters(url))
        assert mgmt(f"/api/users/{user}")["tags"] in ([], "")
    finally:
        httpx.delete(f"{services.RABBIT_MGMT}/api/users/{user}", auth=services.RABBIT_ADMIN, timeout=10)


def test_broker_failure_leaves_nothing_half_made(horde: HordeClient, settings: Settings) -> None:
    """A second API process whose vhost is deleted under it: the broker user is created, setting its
    permissions fails; the client gets a 503, and neither the row nor the user is left."""
    broken_url = services.create_vhost("horde-test-gone")
    broken = settings.model_copy(update={"rabbitmq_url": broken_url, "api_port": free_port()})
    api = start_api(broken, "api-vhost-gone")
    try:
        base = f"http://{broken.api_host}:{broken.api_port}"
        services.delete_vhost(broken_url)
        owner = horde.user("acct-half")
        response = httpx.post(f"{base}/api/v2/workers", json={"name": "acct-half", "models": ["tiny-acct"]},
                              headers={"apikey": owner.apikey}, timeout=30)
        assert (response.status_code, response.json()["rc"]) == (503, "BrokerUnavailable"), response.text
    finally:
        api.stop()
        services.delete_vhost(broken_url)
    with horde.engine.connect() as conn:
        assert conn.execute(sa.select(workers.c.id).where(workers.c.name == "acct-half")).first() is None
    assert mgmt(f"/api/users/{settings.worker_user_prefix}acct-half") is None
    # The name is free again: the real horde registers it.
    assert register(horde, owner, name="acct-half", models=["tiny-acct"]).status_code == 201


# --- revocation ------------------------------------------------------------------------------


def test_delete_closes_connections_and_refuses_logins(horde: HordeClient, settings: Settings, models_dir) -> None:
    owner = horde.user("acct-rev-owner")
    stranger = horde.user("acct-rev-stranger")
    answer = registered(horde, owner, "acct-rev", ["tiny-acct-revoke"])
    user = answer["amqp_user"]
    worker = start_worker(settings, "acct-rev", ["tiny-acct-revoke"], models_dir, amqp_url=answer["amqp_url"])
    try:
        wait_until(lambda: connections_of(user), 20, "the worker's connection")
        refused = horde.http.delete(f"/api/v2/workers/{answer['id']}", headers={"apikey": stranger.apikey})
        assert (refused.status_code, refused.json()["rc"]) == (403, "NotOwner")
        assert connections_of(user)
        deleted = horde.http.delete(f"/api/v2/workers/{answer['id']}", headers={"apikey": owner.apikey})
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"deleted_id": answer["id"], "deleted_name": "acct-rev"}
        wait_until(lambda: not connections_of(user), 15, "the worker's connections to close")
        assert mgmt(f"/api/users/{user}") is None
        with pytest.raises(pika.exceptions.ProbableAuthenticationError, match="Login was refused"):
            pika.BlockingConnection(pika.URLParameters(answer["amqp_url"]))
        # A worker whose user is gone still stops when asked (it used to wait for a channel forever).
        started = time.monotonic()
        assert worker.stop(timeout=30) == 0, worker.log()[-2000:]
        assert time.monotonic() - started < 20
        assert "stopped" in worker.log()
    finally:
        worker.stop()
    with horde.engine.connect() as conn:
        row = conn.execute(sa.select(workers).where(workers.c.name == "acct-rev")).one()
    assert row.suspended_at is not None and "deleted by" in row.suspension_reason
    shown = horde.http.get(f"/api/v2/workers/{answer['id']}").json()
    assert shown["maintenance_mode"] is True
    # A moderator may delete too; deleting again is harmless.
    mod = moderator(horde, "acct-mod")
    again = horde.http.delete(f"/api/v2/workers/{answer['id']}", headers={"apikey": mod.apikey})
    assert again.status_code == 200


# --- pause and maintenance -----------------------------------------------------------------------


def test_paused_worker_gets_no_job_and_unpausing_restores(horde: HordeClient, settings: Settings,
                                                          models_dir) -> None:
    model = "tiny-acct-pause"
    requester = horde.user("acct-pause-req", kudos=500)
    owner = horde.user("acct-pause-owner")
    mod = moderator(horde, "acct-pause-mod")
    paused = registered(horde, owner, "acct-paused", [model])
    other = registered(horde, owner, "acct-other", [model])
    url = f"/api/v2/workers/{paused['id']}"

    # Only moderators pause; the owner may set maintenance, info and priority users.
    refused = horde.http.put(url, json={"paused": True}, headers={"apikey": owner.apikey})
    assert (refused.status_code, refused.json()["rc"]) == (403, "NotModerator")
    bad = horde.http.put(url, json={"priority_usernames": ["nobody#99999"]}, headers={"apikey": owner.apikey})
    assert (bad.status_code, bad.json()["rc"]) == (400, "InvalidPriorityUsername")
    changed = horde.http.put(url, json={"info": "a test GPU", "priority_usernames": [requester.account.username]},
                             headers={"apikey": owner.apikey})
    assert changed.status_code == 200, changed.text
    assert changed.json() == {"info": "a test GPU", "priority_usernames": [requester.account.username]}
    not_owner = horde.http.put(url, json={"priority_usernames": []}, headers={"apikey": mod.apikey})
    assert (not_owner.status_code, not_owner.json()["rc"]) == (403, "NotOwner")

    a = start_worker(settings, "acct-paused", [model], models_dir, amqp_url=paused["amqp_url"])
    try:
        wait_until(lambda: connections_of(paused["amqp_user"]), 20, "the paused-to-be worker's connection")
        answer = horde.http.put(url, json={"paused": True}, headers={"apikey": mod.apikey})
        assert answer.status_code == 200 and answer.json() == {"paused": True}
        assert horde.http.get(url).json()["paused"] is True
        # Its connections are closed and it may read nothing now.
        v = quote(vhost(settings), safe="")
        assert mgmt(f"/api/permissions/{v}/{paused['amqp_user']}")["read"] == "^$"
        a.wait_for_log("paused", timeout=20)
        b = start_worker(settings, "acct-other", [model], models_dir, amqp_url=other["amqp_url"])
        try:
            ids = [horde.submit(requester, prompt=f"paused {i}", models=[model], params=TINY) for i in range(3)]
            for request_id in ids:
                [generation] = horde.wait_done(request_id)["generations"]
                assert generation["worker_name"] == "acct-other"
        finally:
            b.stop()
        assert not _consuming(v, paused["amqp_user"])

        # Back in service: it consumes again and does the next job.
        back = horde.http.put(url, json={"paused": False}, headers={"apikey": mod.apikey})
        assert back.status_code == 200 and back.json() == {"paused": False}
        wait_until(lambda: _consuming(v, paused["amqp_user"]), 60, "the un-paused worker to consume again", a)
        [generation] = horde.wait_done(horde.submit(requester, prompt="back", models=[model],
                                                    params=TINY))["generations"]
        assert generation["worker_name"] == "acct-paused"

        # Maintenance (the owner's) works the same way.
        assert horde.http.put(url, json={"maintenance": True}, headers={"apikey": owner.apikey}).json() == {
            "maintenance": True}
        assert horde.http.get(url).json()["maintenance_mode"] is True
        wait_until(lambda: not _consuming(v, paused["amqp_user"]), 20, "maintenance to stop its consumer")
    finally:
        a.stop()
    # Started while in maintenance, the worker says why it cannot consume and waits; it does not exit.
    again = Process("worker-acct-paused-again", ["worker", "--name", "acct-paused", "--models-dir", str(models_dir),
                                                 "--model", model, "--amqp-url", paused["amqp_url"]], settings)
    try:
        again.wait_for_log("RabbitMQ refused to let this worker consume", timeout=90)
        time.sleep(2)
        assert again.alive()
    finally:
        again.stop()


def _consuming(v: str, user: str) -> bool:
    # ``channel_details`` is an empty list, not an object, while the management API has not yet
    # listed the consumer's channel (a consumer just made, or one whose channel is closing).
    return any(isinstance(details := c.get("channel_details"), dict) and details.get("user") == user
               for c in mgmt(f"/api/consumers/{v}") or [])


def test_paused_http_worker_pops_nothing(horde: HordeClient, settings: Settings) -> None:
    model = "tiny-acct-http"
    requester = horde.user("acct-http-req", kudos=100)
    owner = horde.user("acct-http-owner")
    mod = moderator(horde, "acct-http-mod")
    pop = {"name": "acct-http", "models": [model], "max_pixels": 64 * 64}

    def popped() -> dict[str, Any]:
        response = horde.http.post("/api/v2/generate/pop", json=pop, headers={"apikey": owner.apikey})
        assert response.status_code == 200, response.text
        return response.json()

    assert popped()["id"] is None  # registers it
    worker_id = horde.http.get("/api/v2/workers/name/acct-http").json()["id"]
    url = f"/api/v2/workers/{worker_id}"
    assert horde.http.put(url, json={"paused": True}, headers={"apikey": mod.apikey}).status_code == 200
    request_id = horde.submit(requester, prompt="http pause", models=[model], params=TINY)
    assert popped()["id"] is None
    assert horde.job_rows(request_id)[0].state == "queued"
    assert horde.http.put(url, json={"paused": False}, headers={"apikey": mod.apikey}).status_code == 200
    job = wait_until(lambda: popped()["id"], 20, "the un-paused HTTP worker to get the job")
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(out, format="WEBP")
    submitted = horde.http.post("/api/v2/generate/submit", headers={"apikey": owner.apikey}, json={
        "id": job, "generation": base64.b64encode(out.getvalue()).decode(), "seed": "1"})
    assert submitted.status_code == 200, submitted.text
    assert horde.wait_done(request_id)["generations"][0]["worker_name"] == "acct-http"


def test_modify_is_validated(horde: HordeClient) -> None:
    owner = horde.user("acct-put-owner")
    answer = registered(horde, owner, "acct-put", ["tiny-acct"])
    url = f"/api/v2/workers/{answer['id']}"
    cases = [
        (None, {"info": "x"}, 403, "AnonForbidden"),
        (owner, {}, 400, "BadRequest"),
        (owner, {"name": "renamed"}, 400, "BadRequest"),
        (owner, {"info": "x" * 1001}, 400, "BadRequest"),
        (horde.user("acct-put-stranger"), {"maintenance": True}, 403, "NotOwner"),
    ]
    for who, body, status, rc in cases:
        response = horde.http.put(url, json=body, headers={"apikey": who.apikey if who else "0000000000"})
        assert (response.status_code, response.json().get("rc")) == (status, rc), (body, response.text)
    missing = horde.http.put("/api/v2/workers/999999", json={"info": "x"}, headers={"apikey": owner.apikey})
    assert (missing.status_code, missing.json()["rc"]) == (404, "WorkerNotFound")
    shown = horde.http.get(url).json()
    assert (shown["maintenance_mode"], shown["paused"], shown["flagged"], shown["info"]) == (False, False, False, "")


def test_admin_cli_provisions_a_worker_user(horde: HordeClient, settings: Settings) -> None:
    owner = horde.user("acct-cli-owner")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "admin", "create-worker", "acct-cli", "--owner", owner.account.username,
         "--provision", "--model", "tiny-acct"], env=settings_env(settings), capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 0, result.stderr
    [url] = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("amqp_url: ")]
    user = f"{settings.worker_user_prefix}acct-cli"
    assert urlsplit(url).username == user
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        tag = channel.basic_consume(worker_queue("acct-cli"), lambda *_: None)
        channel.basic_cancel(tag)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
            connection.channel().basic_consume(job_queue("tiny-acct"), lambda *_: None)
    finally:
        connection.close()
    with horde.engine.connect() as conn:
        row = conn.execute(sa.select(workers).where(workers.c.name == "acct-cli")).one()
    assert row.amqp_user == user and row.models == ["tiny-acct"] and row.owner_id == owner.id
    # Without --provision it still registers a development worker on the horde's own user.
    dev = subprocess.run([sys.executable, "-m", "cli.main", "admin", "create-worker", "acct-cli-dev", "--owner",
                          owner.account.username], env=settings_env(settings), capture_output=True, text=True,
                         timeout=60)
    assert dev.returncode == 0 and "registered worker acct-cli-dev" in dev.stdout, dev.stderr
