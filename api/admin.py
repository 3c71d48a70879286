"""The admins' API and page: ledger reports, kudos grants and revokes, roles (admin role only).

- ``GET /api/v2/admin/ledger/entries``: movements filtered by account, worker, model, kind and
  time, newest first, paged; ``format=csv`` answers the same page as CSV.
- ``GET /api/v2/admin/ledger/summary?group_by=day|user|worker|model``: kudos earned and spent,
  jobs, megapixelsteps, tokens per group (meanings in ``ledger.report``); JSON or CSV.
- ``GET /api/v2/admin/ledger/totals``: minted, burned, the users' balances.
- ``POST /api/v2/admin/kudos``: a positive amount is minted to the user, a negative one is taken
  from the user and burned; both are ``admin`` entries whose memo is the reason and the admin.
  An ``Idempotency-Key`` header names the posting, so a retried request applies once.
- ``GET``/``PUT /api/v2/admin/users/{id}/roles``: read, grant or revoke admin, moderator, trusted.
- ``GET /admin``: the admins' page (``api.admin_page``), charts of the kudos flow over these endpoints.

Reports are SQLAlchemy Core in ``ledger.report`` run on a sync connection facade
(``run_sync``), under a statement timeout. Roles are cached per API process for a few seconds
(``api.roles.RoleBook``), so a granted or revoked role takes effect within that time.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from api import admin_page
from api.accounts import Account, find_user
from api.deps import AdminDep, HordeDep
from api.errors import BadRequest, HordeError, UserNotFound, WorkerNotFound
from api.roles import ROLES, parse_roles, set_role
from api.schemas import ErrorBody
from api.state import Horde
from api.tables import users, workers
from config.database import utcnow
from ledger import report
from ledger.book import MAX_ACCOUNT_ID, Leg, balance_units, kudos_units, post
from ledger.errors import InvalidPosting, PostingConflict
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT, entries
from ledger.units import to_kudos

router = APIRouter()
api = APIRouter(prefix="/api/v2/admin", tags=["admin"])

REPORT_TIMEOUT_MS = 30_000
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 403, 404)}
CSV_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "JSON, or CSV with format=csv"},
}
SYSTEM_ACCOUNT_NAMES = {"MINT": MINT_ACCOUNT, "BURN": BURN_ACCOUNT}

Kind = Literal["generation", "uptime", "transfer", "admin", "tax"]
GroupBy = Literal["day", "user", "worker", "model"]
Sort = Literal["key", "earned", "spent", "jobs", "megapixelsteps", "tokens"]
Format = Literal["json", "csv"]
Role = Literal["admin", "moderator", "trusted"]
Since = Annotated[datetime | None, Query(description="From this time (ISO 8601, inclusive; UTC if no offset).")]
Until = Annotated[datetime | None, Query(description="Before this time (ISO 8601, exclusive; UTC if no offset).")]
UserId = Annotated[int, PathParam(ge=0, le=2**31 - 1)]


class IdempotencyKeyReused(HordeError):
    status, rc = 409, "IdempotencyKeyReused"


class ReportTimedOut(HordeError):
    status, rc = 503, "ReportTimedOut"


# --- bodies --------------------------------------------------------------------------------------


class LedgerEntry(BaseModel):
    id: int
    time: str = Field(description="ISO 8601, UTC.")
    account_id: int = Field(description="A user id; -1 is MINT, -2 is BURN.")
    account: str = Field(description="alias#id, MINT or BURN.")
    amount: float = Field(description="Kudos: positive credits the account, negative debits it.")
    kind: Kind
    job_id: str | None
    worker_id: int | None
    worker: str | None
    model: str | None
    memo: str
    megapixelsteps: float
    tokens: int
    key: str = Field(description="The entry's unique key; the part before the last ':' names its posting.")


class LedgerEntries(BaseModel):
    page: int
    per_page: int
    has_more: bool = Field(description="Whether the next page holds entries.")
    entries: list[LedgerEntry]


class SummaryGroup(BaseModel):
    group: str = Field(description="The day (YYYY-MM-DD, UTC), user (alias#id), worker name or model.")
    id: int | None = Field(description="The user's or worker's id.")
    earned: float = Field(description="Kudos credited to users for generations and uptime.")
    spent: float = Field(description="Kudos debited from users for generations and their tax.")
    jobs: int = Field(description="Settled jobs, each once.")
    megapixelsteps: float
    tokens: int


class LedgerSummary(BaseModel):
    group_by: GroupBy
    since: datetime | None
    until: datetime | None
    groups: list[SummaryGroup]


class LedgerTotals(BaseModel):
    minted: float
    burned: float
    users: float = Field(description="The sum of the users' balances.")
    balanced: bool = Field(description="users == minted - burned")


class KudosAdjustment(BaseModel):
    username: str = Field(min_length=1, max_length=200, description="alias#id, id, or a unique alias.")
    amount: float = Field(allow_inf_nan=False, ge=-1e12, le=1e12,
                          description="Kudos: positive grants (minted), negative revokes (burned).")
    reason: str = Field(min_length=1, max_length=250, description="Recorded in the entries' memo.")


class KudosAdjusted(BaseModel):
    username: str
    amount: float = Field(description="The kudos moved: positive granted, negative revoked.")
    balance: float = Field(description="The user's balance afterwards.")
    applied: bool = Field(description="False when this Idempotency-Key was applied before (nothing changed).")


class RoleChange(BaseModel):
    role: Role
    granted: bool = Field(description="True grants the role, false revokes it.")


class UserRoles(BaseModel):
    id: int
    username: str
    roles: list[Role]


# --- lookups shared with the CLI (sync, on a Connection) -----------------------------------------


def resolve_account(conn: Connection, name: str) -> int:
    """An account id from alias#id, an id, a unique alias, or MINT / BURN."""
    name = name.strip()
    if name.upper() in SYSTEM_ACCOUNT_NAMES:
        return SYSTEM_ACCOUNT_NAMES[name.upper()]
    user = lookup_user(conn, name)
    if user is None:
        raise UserNotFound(f"No user {name!r}: give alias#id, an id, or a unique alias.")
    return user.id


def lookup_user(conn: Connection, name: str) -> Account | None:
    """``api.accounts.find_user``, but an id beyond the id column's range is nobody (not a database error)."""
    ident = name.rpartition("#")[2]
    if ident.isdigit() and int(ident) > MAX_ACCOUNT_ID:
        return None
    return find_user(conn, name)


def resolve_worker(conn: Connection, name: str) -> int:
    """A worker id from its id or its name."""
    name = name.strip()
    by_id = name.isdigit() and int(name) <= MAX_ACCOUNT_ID
    where = workers.c.id == int(name) if by_id else workers.c.name == name
    found = conn.execute(sa.select(workers.c.id).where(where)).scalar_one_or_none()
    if found is None:
        raise WorkerNotFound(f"No worker {name!r}.")
    return int(found)


def account_labels(conn: Connection, ids: Iterable[int]) -> dict[int, str]:
    wanted = sorted({i for i in ids if i >= 0})
    rows = conn.execute(sa.select(users.c.id, users.c.alias).where(users.c.id.in_(wanted))) if wanted else []
    return {row.id: f"{row.alias}#{row.id}" for row in rows}


def worker_labels(conn: Connection, ids: Iterable[int | None]) -> dict[int, str]:
    wanted = sorted({i for i in ids if i is not None})
    rows = conn.execute(sa.select(workers.c.id, workers.c.name).where(workers.c.id.in_(wanted))) if wanted else []
    return {row.id: row.name for row in rows}


def entry_records(conn: Connection, where: report.EntryFilter, page: int, per_page: int
                  ) -> tuple[report.EntryPage, list[dict[str, Any]]]:
    found = report.entries_page(conn, where, page=page, per_page=per_page)
    accounts = account_labels(conn, (e.account_id for e in found.entries))
    names = worker_labels(conn, (e.worker_id for e in found.entries))
    return found, [report.entry_record(e, accounts, names) for e in found.entries]


def summary_records(conn: Connection, group_by: str, *, since: datetime | None, until: datetime | None,
                    sort: str = "key", limit: int | None = None) -> list[dict[str, Any]]:
    rows = report.summary(conn, group_by, since=since, until=until, sort=sort, limit=limit)
    keys = [r.key for r in rows]
    names: dict[int, str] = {}
    if group_by == "user":
        names = account_labels(conn, keys)  # type: ignore[arg-type]
    elif group_by == "worker":
        names = worker_labels(conn, keys)  # type: ignore[arg-type]
    return [report.summary_record(r, group_by, names) for r in rows]


# --- reports -------------------------------------------------------------------------------------

T = TypeVar("T")


async def _read(h: Horde, work: Callable[[Connection], T]) -> T:
    """Run a report on a sync facade of an async connection: on PostgreSQL in one snapshot
    (REPEATABLE READ, so totals taken by several statements agree) and under a statement timeout."""
    async with h.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ")
            await conn.execute(sa.text(f"SET LOCAL statement_timeout = {REPORT_TIMEOUT_MS}"))
        try:
            return await conn.run_sync(work)
        except DBAPIError as exc:
            if "statement timeout" in str(exc.orig):
                raise ReportTimedOut("The report took too long: narrow the time range.") from None
            raise


def _period(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The time range in UTC (times without an offset are UTC); refused if empty."""
    since, until = (report.utc(t) if t is not None else None for t in (since, until))
    if since is not None and until is not None and since >= until:
        raise BadRequest("since must be before until.")
    return since, until


def _csv(name: str, fields: tuple[str, ...], records: list[dict[str, Any]], **headers: str) -> Response:
    return Response(report.to_csv(fields, records), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}.csv"', **headers})


@api.get("/ledger/entries", response_model=LedgerEntries, responses={**ERRORS, **CSV_OR_JSON})
async def ledger_entries(
        h: HordeDep, _: AdminDep,
        account: Annotated[str | None, Query(max_length=200, description="alias#id, id, MINT or BURN.")] = None,
        worker: Annotated[str | None, Query(max_length=100, description="The worker's id or name.")] = None,
        model: Annotated[str | None, Query(max_length=200)] = None,
        kind: Kind | None = None, since: Since = None, until: Until = None,
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=report.MAX_PER_PAGE)] = 100,
        format: Format = "json",  # noqa: A002 - the query parameter's name
) -> LedgerEntries | Response:
    """Ledger movements, newest first (ties by id). CSV has the same columns, with a header row."""
    since, until = _period(since, until)

    def work(conn: Connection) -> tuple[report.EntryPage, list[dict[str, Any]]]:
        where = report.EntryFilter(
            account_id=resolve_account(conn, account) if account is not None else None,
            worker_id=resolve_worker(conn, worker) if worker is not None else None,
            model=model, kind=kind, since=since, until=until)
        return entry_records(conn, where, page, per_page)

    found, records = await _read(h, work)
    if format == "csv":
        return _csv("ledger-entries", report.ENTRY_FIELDS, records, **{"X-Has-More": str(found.has_more).lower()})
    return LedgerEntries(page=page, per_page=per_page, has_more=found.has_more,
                         entries=[LedgerEntry(**r) for r in records])


@api.get("/ledger/summary", response_model=LedgerSummary, responses={**ERRORS, **CSV_OR_JSON})
async def ledger_summary(
        h: HordeDep, _: AdminDep, group_by: GroupBy = "day", since: Since = None, until: Until = None,
        sort: Annotated[Sort, Query(description="key ascending, or a sum descending.")] = "key",
        limit: Annotated[int | None, Query(ge=1, le=100_000, description="Keep the first groups.")] = None,
        format: Format = "json",  # noqa: A002 - the query parameter's name
) -> LedgerSummary | Response:
    """Per day (UTC), user, worker or model: kudos earned and spent, jobs, megapixelsteps, tokens."""
    since, until = _period(since, until)
    records = await _read(h, lambda c: summary_records(c, group_by, since=since, until=until, sort=sort,
                                                       limit=limit))
    if format == "csv":
        return _csv(f"ledger-summary-{group_by}", report.SUMMARY_FIELDS, records)
    return LedgerSummary(group_by=group_by, since=since, until=until,
                         groups=[SummaryGroup(**{**r, "group": str(r["group"])}) for r in records])


@api.get("/ledger/totals", response_model=LedgerTotals, responses=ERRORS)
async def ledger_totals(h: HordeDep, _: AdminDep) -> LedgerTotals:
    """What was minted and burned, and what the users hold (equal to minted - burned)."""
    t = await _read(h, report.totals)
    return LedgerTotals(minted=to_kudos(t.minted), burned=to_kudos(t.burned), users=to_kudos(t.users),
                        balanced=t.balanced)


# --- kudos ---------------------------------------------------------------------------------------


def adjust_kudos(conn: Connection, admin: Account, body: KudosAdjustment, key: str | None) -> KudosAdjusted:
    """Mint to (amount > 0) or burn from (amount < 0) a user, once per key, in the caller's transaction."""
    user = lookup_user(conn, body.username.strip())
    if user is None:
        raise UserNotFound(f"No user {body.username!r}: give alias#id, an id, or a unique alias.")
    try:
        units = kudos_units(body.amount)
    except InvalidPosting as exc:
        raise BadRequest(str(exc)) from None
    if units == 0:
        raise BadRequest("The amount must be at least 0.01 kudos, or at most -0.01 to revoke.")
    # One group per request: a retry with the same key finds its user leg, whatever the sign.
    group = f"admin:{hashlib.sha256(f'{admin.id}:{key}'.encode()).hexdigest()[:40]}" if key \
        else f"admin:{uuid.uuid4().hex}"
    system = Leg(MINT_ACCOUNT, -units, f"{group}:mint") if units > 0 else Leg(BURN_ACCOUNT, -units, f"{group}:burn")
    legs = [Leg(user.id, units, f"{group}:user"), system]
    applied, previous = False, _replayed(conn, group, user.id, units)
    if previous is None:
        applied = post(conn, legs, kind="admin", memo=f"{body.reason.strip()} (by {admin.username})", now=utcnow())
        previous = None if applied else _replayed(conn, group, user.id, units)  # posted meanwhile by a twin
    if previous is False:
        raise IdempotencyKeyReused("This Idempotency-Key was used for another adjustment.")
    return KudosAdjusted(username=user.username, amount=to_kudos(units), balance=to_kudos(balance_units(conn, user.id)),
                         applied=applied)


def _replayed(conn: Connection, group: str, account_id: int, units: int) -> bool | None:
    """None if the group was never posted; else whether it was posted for this user and amount."""
    row = conn.execute(sa.select(entries.c.account_id, entries.c.amount)
                       .where(entries.c.key == f"{group}:user")).first()
    return None if row is None else (row.account_id, row.amount) == (account_id, units)


@api.post("/kudos", response_model=KudosAdjusted, responses={**ERRORS, 409: {"model": ErrorBody}})
async def post_kudos(body: KudosAdjustment, h: HordeDep, admin: AdminDep,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> KudosAdjusted:
    """Grant (positive amount, minted) or revoke (negative amount, burned) a user's kudos, with a reason."""
    try:
        async with h.engine.begin() as conn:
            return await conn.run_sync(lambda c: adjust_kudos(c, admin, body, idempotency_key))
    except PostingConflict:  # a concurrent request with this key, other legs: the transaction rolled back
        raise IdempotencyKeyReused("This Idempotency-Key was used for another adjustment.") from None


# --- roles ---------------------------------------------------------------------------------------


def _user_roles(conn: Connection, user_id: int) -> UserRoles:
    row = conn.execute(sa.select(users.c.id, users.c.alias, users.c.roles).where(users.c.id == user_id)).first()
    if row is None:
        raise UserNotFound(f"No user with id {user_id}.")
    return UserRoles(id=row.id, username=f"{row.alias}#{row.id}",
                     roles=[r for r in ROLES if r in parse_roles(row.roles)])  # type: ignore[misc]


def _change_role(conn: Connection, user_id: int, change: RoleChange) -> UserRoles:
    _user_roles(conn, user_id)  # 404 for an unknown user
    set_role(conn, user_id, change.role, granted=change.granted)
    return _user_roles(conn, user_id)


@api.get("/users/{user_id}/roles", response_model=UserRoles, responses=ERRORS)
async def get_roles(user_id: UserId, h: HordeDep, _: AdminDep) -> UserRoles:
    """A user's roles."""
    async with h.engine.connect() as conn:
        return await conn.run_sync(lambda c: _user_roles(c, user_id))


@api.put("/users/{user_id}/roles", response_model=UserRoles, responses=ERRORS)
async def put_roles(user_id: UserId, change: RoleChange, h: HordeDep,
                    _: AdminDep) -> UserRoles:
    """Grant or revoke admin, moderator or trusted: at once in this process, within seconds in others."""
    async with h.engine.begin() as conn:
        changed = await conn.run_sync(lambda c: _change_role(c, user_id, change))
    h.roles.forget(user_id)
    return changed


router.include_router(api)
router.include_router(admin_page.router)
