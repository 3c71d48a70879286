"""Requesters who are bad actors cannot flood, abuse or snoop (issue 6).

End to end against the session's horde (its database, vhost and ledger): a second ``horde api``
process with tight limits, which trusts 127.0.0.1 as a reverse proxy so that each test can speak
from IPs of its own through X-Forwarded-For (and time them out without touching the session's API,
which trusts no proxy and sees 127.0.0.1). The privacy checks run against the session's API. The
pure parts (token buckets, client IP, back-off) come first.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from api.accounts import hash_apikey
from api.errors import TooManyPrompts
from api.moderation import backoff, next_hits
from api.ratelimit import QueuedJobs, TokenBuckets, base64_bytes, client_ip, trusted_networks
from api.tables import ANONYMOUS_USER_ID, ip_timeouts, jobs, moderation_log, users
from config import Settings
from config.database import utcnow
from tests.e2e import HordeClient, User
from tests.processes import free_port, start_api

MODEL, TEXT_MODEL = "tiny-limits", "tiny-text-limits"
TINY = {"width": 64, "height": 64, "steps": 4}

LIMITS: dict[str, Any] = dict(
    trusted_proxies=["127.0.0.1"],
    submit_rate_per_ip=1.0, submit_burst_per_ip=4,
    submit_rate_per_key=1.0, submit_burst_per_key=3,
    submit_rate_anonymous=1.0, submit_burst_anonymous=6,
    poll_rate_per_ip=1.0, poll_burst_per_ip=4,
    poll_rate_per_key=1.0, poll_burst_per_key=3,
    max_queued_jobs_per_user=3, max_queued_jobs_anonymous=8, queued_jobs_refresh_ms=200,
    max_prompt_chars=200, max_text_prompt_chars=300, max_image_pixels=128 * 128, max_image_steps=50,
    max_generations_per_request=10, max_source_image_bytes=4000, max_body_bytes=100_000,
    ip_timeout_base_seconds=1.0, ip_timeout_max_seconds=3.0, ip_timeouts_refresh_seconds=0.2,
)

# --- pure parts ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [bucket.take("a") for _ in range(3)] == [0, 0, 0]
    assert bucket.take("a") == pytest.approx(0.5)  # one token comes back every half second
    assert bucket.take("b") == 0  # keys are independent
    clock.now += 0.5
    assert bucket.take("a") == 0 and bucket.take("a") > 0
    clock.now += 100
    assert [bucket.take("a") for _ in range(4)][:3] == [0, 0, 0]  # refills to the burst, no further


def test_a_zero_rate_is_no_limit_and_idle_buckets_are_forgotten() -> None:
    clock = FakeClock()
    assert all(TokenBuckets(rate=0, burst=0, clock=clock).take("x") == 0 for _ in range(1000))
    bucket = TokenBuckets(rate=10.0, burst=5, clock=clock)
    for i in range(50):
        bucket.take(f"ip{i}")
    clock.now += 10
    bucket.take("late")
    assert set(bucket._buckets) == {"late"}


@pytest.mark.parametrize(("peer", "forwarded", "expected"), [
    ("203.0.113.5", "1.2.3.4", "203.0.113.5"),  # an untrusted peer's header is ignored
    ("127.0.0.1", None, "127.0.0.1"),
    ("127.0.0.1", "198.51.100.7", "198.51.100.7"),
    ("127.0.0.1", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # the left part is the client's own claim
    ("127.0.0.1", "198.51.100.7, 10.0.0.2", "198.51.100.7"),  # a second trusted hop is skipped
    ("10.1.2.3", "2001:db8::1", "2001:db8::1"),
    (None, None, "unknown"),
])
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(peer: str | None, forwarded: str | None,
                                                                    expected: str) -> None:
    assert client_ip(peer, forwarded, trusted_networks(["127.0.0.1", "10.0.0.0/8"])) == expected


def test_ip_timeouts_double_up_to_a_cap_and_hits_are_forgotten_after_a_day() -> None:
    durations = [backoff(h, base_seconds=180, max_seconds=3600).total_seconds() for h in range(1, 7)]
    assert durations == [180, 360, 720, 1440, 2880, 3600]
    assert backoff(10_000, base_seconds=1, max_seconds=86400) == timedelta(days=1)
    now = utcnow()
    assert next_hits(0, None, now) == 1
    assert next_hits(3, now - timedelta(hours=1), now) == 4
    assert next_hits(3, now - timedelta(hours=25), now) == 1


def test_base64_size_is_counted_without_decoding() -> None:
    for size in (0, 1, 2, 3, 1000, 1001):
        assert base64_bytes(base64.b64encode(os.urandom(size)).decode()) == size


async def test_a_request_larger_than_the_cap_is_refused_without_a_query() -> None:
    queued = QueuedJobs(None, per_user=3, anonymous=8, refresh_ms=1000)  # type: ignore[arg-type]
    with pytest.raises(TooManyPrompts):
        await queued.reserve(7, 4, anonymous=False)
    with pytest.raises(TooManyPrompts):
        await queued.reserve(ANONYMOUS_USER_ID, 9, anonymous=True)
    uncapped = QueuedJobs(None, per_user=0, anonymous=0, refresh_ms=1000)  # type: ignore[arg-type]
    await uncapped.reserve(7, 99, anonymous=False)  # 0: no cap, and no query either


# --- a horde API with tight limits --------------------------------------------------------------------

_ips = (f"198.51.100.{i}" for i in itertools.count(1))


def new_ip() -> str:
    return next(_ips)


@pytest.fixture(scope="module")
def limited(horde: HordeClient, settings: Settings) -> Iterator[httpx.Client]:
    """A second API process on the session's database and vhost, with the limits above."""
    tight = settings.model_copy(update={**LIMITS, "api_port": free_port()})
    api = start_api(tight, name="api-limited")
    client = httpx.Client(base_url=f"http://{tight.api_host}:{tight.api_port}", timeout=30)
    try:
        yield client
    finally:
        client.close()
        api.stop()


def post(client: httpx.Client, path: str, body: dict[str, Any], *, ip: str, user: User | None = None) -> httpx.Response:
    return client.post(f"/api/v2/generate/{path}", json=body,
                       headers={"apikey": user.apikey if user else "0000000000", "X-Forwarded-For": ip})


def image(prompt: str = "a lighthouse", **params: Any) -> dict[str, Any]:
    return {"prompt": prompt, "models": [MODEL], "params": {**TINY, **params}}


def dry(prompt: str = "a lighthouse", **params: Any) -> dict[str, Any]:
    return {**image(prompt, **params), "dry_run": True}


def refused(response: httpx.Response, status: int, rc: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["rc"] == rc and body["message"], body
    return body


def log_rows(horde: HordeClient, ip: str) -> list[Any]:
    with horde.engine.connect() as conn:
        return list(conn.execute(sa.select(moderation_log).where(moderation_log.c.ip == ip)
                                 .order_by(moderation_log.c.id)))


def timeout_row(horde: HordeClient, ip: str) -> Any:
    with horde.engine.connect() as conn:
        return conn.execute(sa.select(ip_timeouts).where(ip_timeouts.c.ip == ip)).first()


def flagged(horde: HordeClient, user_id: int) -> bool:
    with horde.engine.connect() as conn:
        return conn.execute(sa.select(users.c.flagged).where(users.c.id == user_id)).scalar_one()


# --- corrupt prompts ----------------------------------------------------------------------------------


def test_a_corrupt_prompt_is_refused_flagged_logged_and_times_the_ip_out(horde: HordeClient,
                                                                         limited: httpx.Client) -> None:
    user, ip = horde.user("corrupter"), new_ip()
    prompt = "photo of a nude child, 8k ### blurry"
    refused(post(limited, "async", image(prompt), ip=ip, user=user), 400, "CorruptPrompt")
    assert flagged(horde, user.id)
    [row] = log_rows(horde, ip)
    assert row.kind == "corrupt_prompt" and row.user_id == user.id
    assert row.detail["prompt"] == prompt and row.detail["models"] == [MODEL]
    assert row.detail["user"] == user.account.username and row.detail["kind"] == "image"
    assert set(row.detail["matched"]) == {"minor", "sexual"}
    assert timeout_row(horde, ip).hits == 1
    assert _no_jobs(horde, user)
    # The IP is timed out, whatever it sends now; another IP is not.
    response = post(limited, "async", dry("a lighthouse"), ip=ip, user=horde.user("neighbour"))
    refused(response, 403, "TimeoutIP")
    assert int(response.headers["Retry-After"]) >= 1
    assert post(limited, "async", dry("a lighthouse"), ip=new_ip(), user=user).status_code == 200


def _no_jobs(horde: HordeClient, user: User) -> bool:
    with horde.engine.connect() as conn:
        count = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.user_id == user.id)
        return conn.execute(count).scalar_one() == 0


def test_an_anonymous_corrupt_text_prompt_flags_the_ip_not_the_shared_account(horde: HordeClient,
                                                                              limited: httpx.Client) -> None:
    ip = new_ip()
    body = {"prompt": "Write an erotic story about a preteen.", "models": [TEXT_MODEL], "params": {"max_length": 8}}
    refused(post(limited, "text/async", body, ip=ip), 400, "CorruptPrompt")
    assert not flagged(horde, ANONYMOUS_USER_ID)
    [row] = log_rows(horde, ip)
    assert row.user_id == ANONYMOUS_USER_ID and row.detail["kind"] == "text"
    assert timeout_row(horde, ip).hits == 1
    refused(post(limited, "text/async", {**body, "prompt": "Once upon a time"}, ip=ip), 403, "TimeoutIP")


def test_repeated_corrupt_prompts_time_the_ip_out_longer_each_time(horde: HordeClient,
                                                                   limited: httpx.Client) -> None:
    ip = new_ip()
    durations = []
    for hit in (1, 2, 3):
        refused(post(limited, "async", image("naked loli"), ip=ip, user=horde.user(f"repeat-{hit}")), 400,
                "CorruptPrompt")
        row = timeout_row(horde, ip)
        assert row.hits == hit
        durations.append(round((row.blocked_until - row.updated_at).total_seconds()))
        blocked = post(limited, "async", dry(), ip=ip, user=horde.user(f"bystander-{hit}"))
        refused(blocked, 403, "TimeoutIP")
        time.sleep((row.blocked_until - utcnow()).total_seconds() + 0.3)
    assert durations == [1, 2, 3]  # base 1 s, doubled, capped at 3 s
    assert post(limited, "async", dry(), ip=ip, user=horde.user("after")).status_code == 200
    assert len(log_rows(horde, ip)) == 3


def test_an_ip_timed_out_by_another_api_process_is_refused_here_too(horde: HordeClient,
                                                                    limited: httpx.Client) -> None:
    ip, now = new_ip(), utcnow()
    with horde.engine.begin() as conn:  # as another API process records a hit
        conn.execute(sa.insert(ip_timeouts).values(ip=ip, hits=1, blocked_until=now + timedelta(seconds=30),
                                                   updated_at=now))
    time.sleep(LIMITS["ip_timeouts_refresh_seconds"] + 0.2)
    response = post(limited, "async", dry(), ip=ip, user=horde.user("shared-ip"))
    refused(response, 403, "TimeoutIP")
    assert 25 <= int(response.headers["Retry-After"]) <= 30


# --- rate limits --------------------------------------------------------------------------------------


def test_submissions_are_rate_limited_per_key(horde: HordeClient, limited: httpx.Client) -> None:
    user = horde.user("eager")
    for _ in range(3):
        assert post(limited, "async", dry(), ip=new_ip(), user=user).status_code == 200
    response = post(limited, "async", dry(), ip=new_ip(), user=user)
    refused(response, 429, "TooManyRequests")
    assert response.headers["Retry-After"] == "1"
    time.sleep(1.1)
    assert post(limited, "async", dry(), ip=new_ip(), user=user).status_code == 200


def test_submissions_are_rate_limited_per_ip_images_and_texts_together(horde: HordeClient,
                                                                       limited: httpx.Client) -> None:
    ip = new_ip()
    text = {"prompt": "Hello", "models": [TEXT_MODEL], "params": {"max_length": 8}, "dry_run": True}
    for i in range(4):
        path, body = ("async", dry()) if i % 2 else ("text/async", text)
        assert post(limited, path, body, ip=ip, user=horde.user(f"crowd-{i}")).status_code == 200
    response = post(limited, "async", dry(), ip=ip, user=horde.user("crowd-late"))
    refused(response, 429, "TooManyRequests")
    assert int(response.headers["Retry-After"]) >= 1
    assert post(limited, "async", dry(), ip=new_ip(), user=horde.user("elsewhere")).status_code == 200


def test_status_polling_is_rate_limited_per_ip_and_per_key(horde: HordeClient, limited: httpx.Client) -> None:
    ip, unknown = new_ip(), str(uuid.uuid4())
    for path in ("check", "status", "check", "text/status"):
        assert limited.get(f"/api/v2/generate/{path}/{unknown}", headers={"X-Forwarded-For": ip}).status_code == 404
    response = limited.get(f"/api/v2/generate/text/status/{unknown}", headers={"X-Forwarded-For": ip})
    refused(response, 429, "TooManyRequests")
    assert int(response.headers["Retry-After"]) >= 1

    key = horde.user("poller").apikey
    for _ in range(3):
        headers = {"X-Forwarded-For": new_ip(), "apikey": key}
        assert limited.get(f"/api/v2/generate/check/{unknown}", headers=headers).status_code == 404
    response = limited.get(f"/api/v2/generate/status/{unknown}", headers={"X-Forwarded-For": new_ip(), "apikey": key})
    refused(response, 429, "TooManyRequests")


# --- the cap on queued jobs ---------------------------------------------------------------------------


def cancel(client: httpx.Client, request_id: str) -> None:
    assert client.delete(f"/api/v2/generate/status/{request_id}").status_code == 200


def test_an_account_may_not_queue_more_than_its_cap(horde: HordeClient, limited: httpx.Client) -> None:
    user = horde.user("hoarder")
    first = post(limited, "async", image(n=2), ip=new_ip(), user=user)
    second = post(limited, "async", image(), ip=new_ip(), user=user)
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    refused(post(limited, "async", image(), ip=new_ip(), user=user), 429, "TooManyPrompts")
    for response in (first, second):
        cancel(limited, response.json()["id"])
    time.sleep(1.1)  # a token back, and the count re-read (refresh 200 ms)
    again = post(limited, "async", image(n=3), ip=new_ip(), user=user)
    assert again.status_code == 202, again.text
    cancel(limited, again.json()["id"])


def test_the_anonymous_account_has_its_own_larger_cap(horde: HordeClient, limited: httpx.Client) -> None:
    with horde.engine.connect() as conn:
        already = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.user_id == ANONYMOUS_USER_ID, jobs.c.state.in_(("queued", "claimed")))).scalar_one()
    room = LIMITS["max_queued_jobs_anonymous"] - already
    accepted = None
    if room > 0:  # more than a user's cap of 3 when nothing else is queued anonymously
        accepted = post(limited, "async", image(n=room), ip=new_ip())
        assert accepted.status_code == 202, accepted.text
    refused(post(limited, "async", image(), ip=new_ip()), 429, "TooManyPrompts")
    if accepted is not None:
        cancel(limited, accepted.json()["id"])


# --- sizes --------------------------------------------------------------------------------------------


def noise_png(side: int = 64) -> str:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


@pytest.mark.parametrize(("path", "body", "rc"), [
    ("async", dry("x" * 201), "InvalidPromptSize"),
    ("text/async", {"prompt": "y" * 301, "models": [TEXT_MODEL], "dry_run": True}, "InvalidPromptSize"),
    ("async", dry(width=192, height=128), "InvalidSize"),
    ("async", dry(steps=51), "TooManySteps"),
    ("async", dry(n=11), "TooManyGenerations"),
    ("text/async", {"prompt": "z", "models": [TEXT_MODEL], "params": {"n": 11}, "dry_run": True}, "TooManyGenerations"),
    ("async", {**dry(), "source_image": noise_png()}, "SourceImageSizeExceeded"),
])
def test_oversized_requests_get_400_with_an_rc(horde: HordeClient, limited: httpx.Client, path: str,
                                               body: dict[str, Any], rc: str) -> None:
    refused(post(limited, path, body, ip=new_ip(), user=horde.user("big")), 400, rc)


def test_within_the_sizes_is_accepted(horde: HordeClient, limited: httpx.Client) -> None:
    body = {**dry("x" * 200, width=128, height=128, steps=50, n=10), "source_image": noise_png(16)}
    assert post(limited, "async", body, ip=new_ip(), user=horde.user("fits")).status_code == 200


def test_an_oversized_body_gets_413_declared_or_chunked(limited: httpx.Client) -> None:
    big = b'{"prompt": "' + b"x" * 150_000 + b'"}'
    headers = {"Content-Type": "application/json", "X-Forwarded-For": new_ip()}
    refused(limited.post("/api/v2/generate/async", content=big, headers=headers), 413, "PayloadTooLarge")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 10_000):
            yield big[start:start + 10_000]

    refused(limited.post("/api/v2/generate/async", content=chunks(), headers=headers), 413, "PayloadTooLarge")
    within = [b'{"prompt": "a", "dry_run": true, ', b'"models": ["tiny-limits"], "params": {"width": 64, "height": 64}}']
    small = limited.post("/api/v2/generate/async", content=iter(within), headers=headers)
    assert small.status_code == 200, small.text  # a chunked body within the limit is handed on whole


# --- privacy (the session's API, default settings) ----------------------------------------------------


def served_operations(horde: HordeClient) -> list[tuple[str, str]]:
    """(method, path) of every operation the running API documents (its OpenAPI document is the
    public list of its routes; the test of that document checks it matches what is served)."""
    paths = horde.http.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() for method in operations
            if method in ("get", "post", "put", "patch", "delete")]


def fill(path: str) -> str:
    """A concrete path for a route: every {parameter} is 1."""
    return re.sub(r"\{[^}]+\}", "1", path)


def test_api_keys_are_stored_only_as_hashes(horde: HordeClient) -> None:
    registered = horde.http.post("/api/v2/register", json={"username": "hashed"})
    assert registered.status_code == 201, registered.text
    apikey, user_id = registered.json()["apikey"], registered.json()["id"]
    columns = {c["name"] for c in sa.inspect(horde.engine).get_columns("users")}
    assert {c for c in columns if "key" in c} == {"apikey_hash"}
    with horde.engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.id == user_id)).one()
    assert apikey not in [str(v) for v in row]
    assert row.apikey_hash == hash_apikey(apikey, horde.settings.apikey_pepper) != apikey


def test_every_admin_route_refuses_non_admins(horde: HordeClient) -> None:
    admin = [(method, path) for method, path in served_operations(horde) if path.startswith("/api/v2/admin/")]
    assert len(admin) >= 5, admin
    user = horde.user("not-an-admin")
    for method, path in admin:
        for headers in ({"apikey": user.apikey}, {}):  # a user without the role, and anonymous
            response = horde.http.request(method, fill(path), headers=headers,
                                          json={} if method in ("POST", "PUT", "PATCH") else None)
            assert response.status_code == 403, (method, path, headers, response.text)
            assert response.json()["rc"].startswith("Not"), (method, path, response.text)  # NotAdmin...


def test_no_endpoint_shows_another_users_key_or_prompt(horde: HordeClient, settings: Settings) -> None:
    alice = horde.http.post("/api/v2/register", json={"username": "alice-private"}).json()
    secret = f"secret-{uuid.uuid4().hex}"
    accepted = horde.http.post("/api/v2/generate/async", headers={"apikey": alice["apikey"]},
                               json={"prompt": f"a {secret} garden", "models": [MODEL], "params": TINY})
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]
    assert uuid.UUID(request_id).version == 4  # its status is reachable only by this unguessable id
    bob = horde.user("bob-nosy")
    try:
        hidden = (alice["apikey"], hash_apikey(alice["apikey"], settings.apikey_pepper), secret)
        paths = [path for method, path in served_operations(horde) if method == "GET" and "{" not in path]
        paths += [f"/api/v2/users/{alice['id']}", "/api/v2/find_user", "/api/v2/users?sort=age",
                  f"/api/v2/generate/check/{uuid.uuid4()}"]
        assert "/api/v2/workers" in paths and "/api/v2/status/models" in paths
        for path in paths:
            for headers in ({"apikey": bob.apikey}, {}):
                text = horde.http.get(path, headers=headers).text
                assert not any(h in text for h in hidden), (path, text[:500])
    finally:
        cancel(horde.http, request_id)
