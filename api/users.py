"""Users in AI Horde API v2's shapes: find_user, users/{id}, the leaderboard, and registration.

A user's ``kudos`` is its ledger balance; ``kudos_details`` and ``records`` are folded from its
ledger entries (each generation entry carries the megapixelsteps or tokens it paid for), so they
always agree with the balance. Registration is ``POST /api/v2/register``: AI Horde registers
through a web page (OAuth or pseudonymous); this horde's accounts are all pseudonymous, and the
endpoint returns the 22-character API key once (it is stored only hashed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Header, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from api.accounts import ANONYMOUS, MAX_USER_ID, Account, create_user
from api.deps import HordeDep
from api.errors import BadRequest, Forbidden, InvalidAPIKey, UserNotFound
from api.schemas import ErrorBody
from api.tables import users, workers
from config.database import as_utc, utcnow
from ledger.tables import balances, entries
from ledger.units import to_kudos

router = APIRouter(prefix="/api/v2", tags=["users"])

PAGE_SIZE = 25
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 403, 404)}


class UserKudosDetails(BaseModel):
    accumulated: float = Field(0, description="Earned by generating, minus spent on requests (and tax).")
    gifted: float = Field(0, description="Sent to other users (negative).")
    donated: float = 0
    received: float = Field(0, description="Received from other users.")
    admin: float = Field(0, description="Granted by the horde's admins.")
    recurring: float = 0
    awarded: float = 0
    styled: float = 0


class UserThingRecords(BaseModel):
    megapixelsteps: float = 0
    tokens: int = 0


class UserAmountRecords(BaseModel):
    image: int = 0
    text: int = 0
    interrogation: int = 0


class UserRecords(BaseModel):
    usage: UserThingRecords = Field(default_factory=UserThingRecords, description="What this user's requests used.")
    contribution: UserThingRecords = Field(default_factory=UserThingRecords,
                                           description="What this user's workers generated.")
    fulfillment: UserAmountRecords = Field(default_factory=UserAmountRecords)
    request: UserAmountRecords = Field(default_factory=UserAmountRecords)


class UsageDetails(BaseModel):
    megapixelsteps: float = 0
    requests: int = 0


class ContributionsDetails(BaseModel):
    megapixelsteps: float = 0
    fulfillments: int = 0


class UserDetails(BaseModel):
    id: int
    username: str = Field(description="alias#id")
    kudos: float
    kudos_details: UserKudosDetails
    records: UserRecords
    usage: UsageDetails
    contributions: ContributionsDetails
    worker_count: int
    worker_ids: list[str] | None = Field(None, description="Only to the user itself.")
    sharedkey_ids: list[str] | None = None
    account_age: int = Field(description="Seconds since the account was created.")
    concurrency: int = 30
    worker_invited: int = 1
    moderator: bool = False
    trusted: bool = False
    flagged: bool = False
    pseudonymous: bool = True
    service: bool = False
    education: bool = False
    customizer: bool = False
    deleted: bool = False
    styles: list[dict[str, str]] = Field(default_factory=list)


class Registration(BaseModel):
    username: str = Field(min_length=1, max_length=100, description="The alias; the username becomes alias#id.")


class Registered(BaseModel):
    id: int
    username: str
    apikey: str = Field(description="22 characters; shown once, stored only hashed.")


async def _ledger_folds(conn: AsyncConnection, ids: list[int]) -> dict[int, tuple[UserKudosDetails, UserRecords]]:
    """kudos_details and records of each account, from its ledger entries (one grouped query)."""
    credit = (entries.c.amount > 0).label("credit")
    text = (entries.c.tokens > 0).label("text")
    rows = await conn.execute(
        sa.select(entries.c.account_id, entries.c.kind, credit, text, sa.func.sum(entries.c.amount),
                  sa.func.count(), sa.func.sum(entries.c.megapixelsteps), sa.func.sum(entries.c.tokens))
        .where(entries.c.account_id.in_(ids))
        .group_by(entries.c.account_id, entries.c.kind, credit, text)
    )
    details: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    records = {i: UserRecords() for i in ids}
    for account_id, kind, is_credit, is_text, units, count, mps, tokens in rows:
        bucket = {"transfer": "received" if is_credit else "gifted", "admin": "admin"}.get(kind, "accumulated")
        details[account_id][bucket] += int(units or 0)
        if kind != "generation":
            continue
        r = records[account_id]
        work = r.contribution if is_credit else r.usage
        work.megapixelsteps = round(work.megapixelsteps + float(mps or 0), 2)
        work.tokens += int(tokens or 0)
        amounts = r.fulfillment if is_credit else r.request
        setattr(amounts, "text" if is_text else "image", getattr(amounts, "text" if is_text else "image") + count)
    return {i: (UserKudosDetails(**{k: to_kudos(int(v)) for k, v in details[i].items()}), records[i]) for i in ids}


async def user_details(conn: AsyncConnection, rows: list[Any], *, own: set[int]) -> list[UserDetails]:
    """Details of the ``users`` rows, in order; ``own`` are the ids the caller may see privately."""
    ids = [r.id for r in rows]
    if not ids:
        return []
    kudos = dict((await conn.execute(
        sa.select(balances.c.account_id, balances.c.balance).where(balances.c.account_id.in_(ids)))).all())
    owned: dict[int, list[str]] = defaultdict(list)
    for worker_id, owner_id in await conn.execute(
            sa.select(workers.c.id, workers.c.owner_id).where(workers.c.owner_id.in_(ids)).order_by(workers.c.id)):
        owned[owner_id].append(str(worker_id))
    folds = await _ledger_folds(conn, ids)
    now = utcnow()
    out = []
    for row in rows:
        kudos_details, records = folds[row.id]
        out.append(UserDetails(
            id=row.id, username=f"{row.alias}#{row.id}", kudos=to_kudos(int(kudos.get(row.id) or 0)),
            kudos_details=kudos_details, records=records,
            usage=UsageDetails(megapixelsteps=records.usage.megapixelsteps,
                               requests=records.request.image + records.request.text),
            contributions=ContributionsDetails(megapixelsteps=records.contribution.megapixelsteps,
                                               fulfillments=records.fulfillment.image + records.fulfillment.text),
            worker_count=len(owned[row.id]),
            worker_ids=owned[row.id] if row.id in own else None,
            sharedkey_ids=[] if row.id in own else None,
            account_age=max(0, int((now - as_utc(row.created_at)).total_seconds())),
            trusted="trusted" in (row.roles or "").split(","),
            moderator="moderator" in (row.roles or "").split(","),
        ))
    return out


_USER_COLUMNS = (users.c.id, users.c.alias, users.c.roles, users.c.created_at)


async def _one(h: HordeDep, user_id: int, *, own: bool) -> UserDetails:
    async with h.engine.connect() as conn:
        row = (await conn.execute(sa.select(*_USER_COLUMNS).where(users.c.id == user_id))).first()
        if row is None:
            raise UserNotFound(f"No user with id {user_id}.")
        [details] = await user_details(conn, [row], own={user_id} if own else set())
    return details


async def _caller(h: HordeDep, apikey: str | None) -> Account | None:
    """The account an optional ``apikey`` header names; None when absent or unknown."""
    if not apikey:
        return None
    try:
        return await h.auth.account(apikey)
    except InvalidAPIKey:
        return None


@router.get("/find_user", response_model=UserDetails, response_model_exclude_none=True, responses=ERRORS)
async def find_user(h: HordeDep, apikey: Annotated[str | None, Header()] = None) -> UserDetails:
    """The user an API key belongs to, with the details only its owner sees."""
    try:
        account = await h.auth.account(apikey) if apikey else ANONYMOUS
    except InvalidAPIKey as exc:
        raise UserNotFound("No user matches this API key.") from exc
    return await _one(h, account.id, own=not account.anonymous)


@router.get("/users/{user_id}", response_model=UserDetails, response_model_exclude_none=True, responses=ERRORS)
async def get_user(user_id: Annotated[int, Path(ge=0, le=MAX_USER_ID)], h: HordeDep,
                   apikey: Annotated[str | None, Header()] = None) -> UserDetails:
    """A user's public details (and private ones when ``apikey`` is its own)."""
    caller = await _caller(h, apikey)
    return await _one(h, user_id, own=caller is not None and caller.id == user_id and not caller.anonymous)


@router.get("/users", response_model=list[UserDetails], response_model_exclude_none=True, responses=ERRORS)
async def list_users(h: HordeDep, page: Annotated[int, Query(ge=1, le=100_000)] = 1,
                     sort: Literal["kudos", "age"] = "kudos") -> list[UserDetails]:
    """The leaderboard: 25 users a page, by kudos (highest first) or by age (oldest first)."""
    balance = sa.func.coalesce(balances.c.balance, 0)
    order = (balance.desc(), users.c.id) if sort == "kudos" else (users.c.created_at, users.c.id)
    async with h.engine.connect() as conn:
        rows = list(await conn.execute(
            sa.select(*_USER_COLUMNS).select_from(users.outerjoin(balances, balances.c.account_id == users.c.id))
            .order_by(*order).limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)))
        return await user_details(conn, rows, own=set())


@router.post("/register", response_model=Registered, status_code=201, responses=ERRORS)
async def register(body: Registration, h: HordeDep) -> Registered:
    """Create a pseudonymous account; the answer holds its API key, which is never shown again."""
    if not h.settings.registration_open:
        raise Forbidden("Registration is closed on this horde; ask its operator for an account.",
                        rc="RegistrationClosed")
    alias = body.username.strip()
    if not alias or not alias.isprintable() or "#" in alias:
        raise BadRequest("A username is 1 to 100 printable characters without '#'.")
    async with h.engine.begin() as conn:
        account, apikey = await conn.run_sync(lambda c: create_user(c, alias, pepper=h.settings.apikey_pepper))
    return Registered(id=account.id, username=account.username, apikey=apikey)

