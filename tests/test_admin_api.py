"""The admin API over real HTTP against the running horde: ledger entries and summaries (JSON and
CSV), kudos grants and revokes, roles; and that nobody but an admin gets in.

The ledger history these tests read is posted in 2001 (``build_scenario``), so the time filters
isolate it from whatever else the session's tests settle now.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from api.roles import set_role
from api.tables import users, workers
from ledger.report import ENTRY_FIELDS, SUMMARY_FIELDS, reconcile
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT, entries
from tests.e2e import HordeClient, User
from tests.test_admin_reports import Cast, build_scenario, expected_summary

T0 = datetime(2001, 3, 1, 10, 0, tzinfo=timezone.utc)
SPAN = {"since": "2001-03-01T00:00:00Z", "until": "2001-03-04T00:00:00Z"}
ENTRIES = "/api/v2/admin/ledger/entries"
SUMMARY = "/api/v2/admin/ledger/summary"


@dataclass(frozen=True)
class World:
    admin: User
    nobody: User
    alice: User
    bob: User
    carol: User
    cast: Cast
    worker_names: dict[int, str]

    def get(self, horde: HordeClient, path: str, **params: Any) -> Any:
        response = horde.http.get(path, params=params, headers={"apikey": self.admin.apikey})
        assert response.status_code == 200, response.text
        return response.json() if params.get("format") != "csv" else response


@pytest.fixture(scope="module")
def world(horde: HordeClient) -> World:
    tag = uuid.uuid4().hex[:6]
    admin, nobody = horde.user(f"admin-{tag}"), horde.user(f"nobody-{tag}")
    alice, bob, carol = (horde.user(f"{name}-{tag}") for name in ("alice", "bob", "carol"))
    for name, owner in ((f"gpu7-{tag}", bob), (f"gpu8-{tag}", bob), (f"gpu9-{tag}", carol)):
        horde.register_worker(name, owner)
    with horde.engine.begin() as conn:
        set_role(conn, admin.id, "admin", granted=True)
        ids = dict(conn.execute(sa.select(workers.c.name, workers.c.id).where(workers.c.name.like(f"%-{tag}"))).all())
        cast = Cast(alice=alice.id, bob=bob.id, carol=carol.id, w7=ids[f"gpu7-{tag}"], w8=ids[f"gpu8-{tag}"],
                    w9=ids[f"gpu9-{tag}"])
        build_scenario(conn, cast, T0)
    return World(admin, nobody, alice, bob, carol, cast, {i: n for n, i in ids.items()})


def _units(kudos: float) -> int:
    return round(kudos * 100)


# --- who gets in ---------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", ENTRIES, None), ("GET", SUMMARY, None), ("GET", "/api/v2/admin/ledger/totals", None),
    ("POST", "/api/v2/admin/kudos", {"username": "Anonymous#0", "amount": 5, "reason": "x"}),
    ("GET", "/api/v2/admin/users/0/roles", None),
    ("PUT", "/api/v2/admin/users/0/roles", {"role": "admin", "granted": True}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_only_admins_get_in(horde: HordeClient, world: World, method: str, path: str, body: Any) -> None:
    for apikey, status, rc in ((world.nobody.apikey, 403, "NotAdmin"), ("0000000000", 403, "NotAdmin"),
                               ("no-such-key-at-all", 401, "InvalidAPIKey")):
        response = horde.http.request(method, path, json=body, headers={"apikey": apikey})
        assert response.status_code == status, response.text
        assert response.json().keys() == {"message", "rc"} and response.json()["rc"] == rc
    with horde.engine.connect() as conn:  # nothing was granted, no role was given
        assert conn.execute(sa.select(entries.c.id).where(entries.c.memo.like("x (by %"))).first() is None
        assert conn.execute(sa.select(users.c.roles).where(users.c.id == 0)).scalar_one() == ""


# --- entries ---------------------------------------------------------------------------------------


def test_entries_filter_by_account_worker_model_kind_and_time(horde: HordeClient, world: World) -> None:
    c = world.cast
    everything = world.get(horde, ENTRIES, per_page=1000, **SPAN)["entries"]
    assert len(everything) == 24
    assert [(e["time"], e["id"]) for e in everything] == sorted(((e["time"], e["id"]) for e in everything),
                                                                reverse=True)
    by_account = world.get(horde, ENTRIES, account=world.alice.account.username, **SPAN)["entries"]
    assert by_account == [e for e in everything if e["account_id"] == c.alice] and len(by_account) == 8
    assert {e["account"] for e in by_account} == {world.alice.account.username}
    assert world.get(horde, ENTRIES, account=str(c.alice), **SPAN)["entries"] == by_account
    burn = world.get(horde, ENTRIES, account="BURN", **SPAN)["entries"]
    assert burn == [e for e in everything if e["account_id"] == BURN_ACCOUNT] and len(burn) == 5  # 4 taxes, 1 revoke
    name9 = world.worker_names[c.w9]
    by_worker = world.get(horde, ENTRIES, worker=name9, **SPAN)["entries"]
    assert by_worker == [e for e in everything if e["worker_id"] == c.w9] and len(by_worker) == 8
    assert {e["worker"] for e in by_worker} == {name9}
    assert world.get(horde, ENTRIES, worker=str(c.w9), **SPAN)["entries"] == by_worker
    by_model = world.get(horde, ENTRIES, model="m1", **SPAN)["entries"]
    assert by_model == [e for e in everything if e["model"] == "m1"] and len(by_model) == 8
    admin = world.get(horde, ENTRIES, kind="admin", **SPAN)["entries"]
    assert {(e["account_id"], e["amount"]) for e in admin} == {
        (c.alice, 100.0), (MINT_ACCOUNT, -100.0), (c.carol, -3.0), (BURN_ACCOUNT, 3.0)}
    day2 = world.get(horde, ENTRIES, since="2001-03-02T00:00:00+00:00", until="2001-03-03T00:00:00")["entries"]
    assert day2 == [e for e in everything if e["time"].startswith("2001-03-02")] and len(day2) == 8


def test_entries_page_through_everything_once(horde: HordeClient, world: World) -> None:
    everything = world.get(horde, ENTRIES, per_page=1000, **SPAN)["entries"]
    seen, page = [], 1
    while True:
        got = world.get(horde, ENTRIES, page=page, per_page=5, **SPAN)
        assert (got["page"], got["per_page"]) == (page, 5)
        seen += got["entries"]
        if not got["has_more"]:
            break
        page += 1
    assert page == 5 and seen == everything


def test_entries_refuse_bad_filters(horde: HordeClient, world: World) -> None:
    headers = {"apikey": world.admin.apikey}
    for params, status, rc in [
        ({"account": "nobody-here#999999"}, 404, "UserNotFound"),
        ({"account": "99999999999999999999"}, 404, "UserNotFound"),
        ({"worker": "no-such-worker"}, 404, "WorkerNotFound"),
        ({"worker": "99999999999999999999"}, 404, "WorkerNotFound"),
        ({"kind": "gift"}, 400, "BadRequest"),
        ({"per_page": 1001}, 400, "BadRequest"),
        ({"page": 0}, 400, "BadRequest"),
        ({"since": "yesterday"}, 400, "BadRequest"),
        ({"since": "2001-03-02T00:00:00Z", "until": "2001-03-01T00:00:00Z"}, 400, "BadRequest"),
        ({"format": "xml"}, 400, "BadRequest"),
    ]:
        response = horde.http.get(ENTRIES, params=params, headers=headers)
        assert (response.status_code, response.json()["rc"]) == (status, rc), (params, response.text)


def test_entries_as_csv_are_the_json_page(horde: HordeClient, world: World) -> None:
    params = {"account": world.carol.account.username, "per_page": 2, "page": 2, **SPAN}  # 6 entries: 3 pages
    page = world.get(horde, ENTRIES, **params)
    response = world.get(horde, ENTRIES, format="csv", **params)
    assert response.headers["content-type"].startswith("text/csv")
    assert page["has_more"] is True and response.headers["x-has-more"] == "true"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == list(ENTRY_FIELDS) and len(rows) == len(page["entries"]) == 2
    for row, entry in zip(rows, page["entries"], strict=True):
        assert set(row) == set(entry)
        for field, value in entry.items():
            if isinstance(value, float):
                assert float(row[field]) == value, field
            else:
                assert row[field] == ("" if value is None else str(value)), field


# --- summary ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_by", ["day", "user", "worker", "model"])
def test_summary_matches_the_hand_worked_sums_in_json_and_csv(horde: HordeClient, world: World,
                                                             group_by: str) -> None:
    body = world.get(horde, SUMMARY, group_by=group_by, **SPAN)
    assert body["group_by"] == group_by
    got = {(g["id"] if group_by in ("user", "worker") else g["group"]):
           (_units(g["earned"]), _units(g["spent"]), g["jobs"], g["megapixelsteps"], g["tokens"])
           for g in body["groups"]}
    assert got == expected_summary(world.cast, T0)[group_by]
    users = {u.id: u.account.username for u in (world.alice, world.bob, world.carol)}
    names = {"user": users, "worker": world.worker_names}.get(group_by)
    if names is not None:
        assert [g["group"] for g in body["groups"]] == [names[g["id"]] for g in body["groups"]]

    rows = list(csv.DictReader(io.StringIO(world.get(horde, SUMMARY, group_by=group_by, format="csv", **SPAN).text)))
    assert list(rows[0]) == list(SUMMARY_FIELDS)
    assert [(r["group"], r["id"], float(r["earned"]), float(r["spent"]), int(r["jobs"]), float(r["megapixelsteps"]),
             int(r["tokens"])) for r in rows] == [
        (g["group"], "" if g["id"] is None else str(g["id"]), g["earned"], g["spent"], g["jobs"], g["megapixelsteps"],
         g["tokens"]) for g in body["groups"]]


def test_summary_top_earners_and_a_day_range(horde: HordeClient, world: World) -> None:
    top = world.get(horde, SUMMARY, group_by="user", sort="earned", limit=2, **SPAN)["groups"]
    assert [(g["group"], g["earned"]) for g in top] == [(world.bob.account.username, 80.0),
                                                        (world.carol.account.username, 9.0)]
    days = world.get(horde, SUMMARY, group_by="day", since="2001-03-02T00:00:00Z", until="2001-03-03T00:00:00Z")
    assert [(g["group"], g["earned"], g["spent"], g["jobs"]) for g in days["groups"]] == [
        ("2001-03-02", 25.0, 26.25, 2)]


# --- kudos -----------------------------------------------------------------------------------------


def _adjust(horde: HordeClient, world: World, user: User, amount: float, reason: str = "support",
            key: str | None = None) -> Any:
    headers = {"apikey": world.admin.apikey, **({"Idempotency-Key": key} if key else {})}
    return horde.http.post("/api/v2/admin/kudos", headers=headers,
                           json={"username": user.account.username, "amount": amount, "reason": reason})


def _group_entries(horde: HordeClient, user: User, memo: str) -> list[Any]:
    with horde.engine.connect() as conn:
        mine = conn.execute(sa.select(entries.c.key).where(entries.c.account_id == user.id,
                                                           entries.c.memo.like(f"{memo}%"))).scalars().all()
        groups = {key.rpartition(":")[0] for key in mine}
        return list(conn.execute(sa.select(entries).where(
            sa.or_(*(entries.c.key.like(f"{g}:%") for g in groups)) if groups else sa.false())))


def test_a_grant_mints_and_a_revoke_burns_with_the_reason_and_the_books_reconcile(horde: HordeClient,
                                                                                  world: World) -> None:
    user = horde.user("adjusted")
    granted = _adjust(horde, world, user, 25.5, reason="bug bounty")
    assert granted.status_code == 200, granted.text
    assert granted.json() == {"username": user.account.username, "amount": 25.5, "balance": 25.5, "applied": True}
    legs = _group_entries(horde, user, "bug bounty")
    assert {(e.account_id, e.amount, e.kind) for e in legs} == {(user.id, 2550, "admin"),
                                                                 (MINT_ACCOUNT, -2550, "admin")}
    assert all(e.memo == f"bug bounty (by {world.admin.account.username})" for e in legs)

    revoked = _adjust(horde, world, user, -40, reason="chargeback")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["amount"] == -40.0 and revoked.json()["balance"] == -14.5  # balances may go negative
    legs = _group_entries(horde, user, "chargeback")
    assert {(e.account_id, e.amount, e.kind) for e in legs} == {(user.id, -4000, "admin"),
                                                                 (BURN_ACCOUNT, 4000, "admin")}
    assert horde.balance(user) == -14.5
    with horde.engine.connect() as conn:
        assert reconcile(conn) == []
    shown = world.get(horde, ENTRIES, account=user.account.username, kind="admin")["entries"]
    assert [(e["amount"], e["memo"]) for e in shown] == [(-40.0, f"chargeback (by {world.admin.account.username})"),
                                                         (25.5, f"bug bounty (by {world.admin.account.username})")]


def test_the_same_idempotency_key_applies_once_even_concurrently(horde: HordeClient, world: World) -> None:
    user = horde.user("idempotent")
    key = str(uuid.uuid4())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _adjust(horde, world, user, 12, reason="retried", key=key), range(8)))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert sorted(a.json()["applied"] for a in answers) == [False] * 7 + [True]
    again = _adjust(horde, world, user, 12, reason="retried", key=key)
    assert again.json() == {"username": user.account.username, "amount": 12.0, "balance": 12.0, "applied": False}
    assert horde.balance(user) == 12.0 and len(_group_entries(horde, user, "retried")) == 2

    for amount in (13, -12):  # the key already names another adjustment
        reused = _adjust(horde, world, user, amount, reason="retried", key=key)
        assert (reused.status_code, reused.json()["rc"]) == (409, "IdempotencyKeyReused")
    assert horde.balance(user) == 12.0
    other = _adjust(horde, world, user, -2, reason="second", key=str(uuid.uuid4()))
    assert other.json()["applied"] is True and horde.balance(user) == 10.0


def test_bad_adjustments_are_refused_and_move_nothing(horde: HordeClient, world: World) -> None:
    user = horde.user("refused")
    for body, status, rc in [
        ({"username": user.account.username, "amount": 0, "reason": "zero"}, 400, "BadRequest"),
        ({"username": user.account.username, "amount": 0.001, "reason": "dust"}, 400, "BadRequest"),
        ({"username": user.account.username, "amount": 5}, 400, "BadRequest"),
        ({"username": user.account.username, "amount": 5, "reason": ""}, 400, "BadRequest"),
        ({"username": "ghost#999999", "amount": 5, "reason": "who"}, 404, "UserNotFound"),
        ({"username": "ghost#99999999999999999999", "amount": 5, "reason": "who"}, 404, "UserNotFound"),
    ]:
        response = horde.http.post("/api/v2/admin/kudos", json=body, headers={"apikey": world.admin.apikey})
        assert (response.status_code, response.json()["rc"]) == (status, rc), (body, response.text)
    assert horde.balance(user) == 0


# --- roles -----------------------------------------------------------------------------------------


def _wait_status(horde: HordeClient, user: User, status: int, timeout: float = 10) -> None:
    """Roles are cached per API process for a few seconds (api.roles.RoleBook)."""
    deadline = time.monotonic() + timeout
    while True:
        got = horde.http.get("/api/v2/admin/ledger/totals", headers={"apikey": user.apikey}).status_code
        if got == status:
            return
        assert time.monotonic() < deadline, f"still {got}, expected {status}"
        time.sleep(0.2)


def test_roles_granted_and_revoked_take_effect(horde: HordeClient, world: World) -> None:
    promoted = horde.user("promoted")
    headers = {"apikey": world.admin.apikey}
    url = f"/api/v2/admin/users/{promoted.id}/roles"
    _wait_status(horde, promoted, 403)
    for role in ("trusted", "moderator", "admin"):
        response = horde.http.put(url, json={"role": role, "granted": True}, headers=headers)
        assert response.status_code == 200, response.text
    assert response.json() == {"id": promoted.id, "username": promoted.account.username,
                               "roles": ["admin", "moderator", "trusted"]}
    _wait_status(horde, promoted, 200)

    revoked = horde.http.put(url, json={"role": "admin", "granted": False}, headers=headers)
    assert revoked.json()["roles"] == ["moderator", "trusted"]
    assert horde.http.get(url, headers=headers).json()["roles"] == ["moderator", "trusted"]
    _wait_status(horde, promoted, 403)

    for path, body, status, rc in [
        (url, {"role": "emperor", "granted": True}, 400, "BadRequest"),
        (url, {"role": "admin"}, 400, "BadRequest"),
        ("/api/v2/admin/users/999999/roles", {"role": "admin", "granted": True}, 404, "UserNotFound"),
    ]:
        response = horde.http.put(path, json=body, headers=headers)
        assert (response.status_code, response.json()["rc"]) == (status, rc), response.text


def test_totals_agree_with_the_books(horde: HordeClient, world: World) -> None:
    totals = world.get(horde, "/api/v2/admin/ledger/totals")
    assert totals["balanced"] is True
    assert totals["users"] == pytest.approx(totals["minted"] - totals["burned"], abs=0.001)
