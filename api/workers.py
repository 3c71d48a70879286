"""Workers in AI Horde API v2's shapes: ``/workers`` (those online), ``/workers/{id}``, ``/workers/name/{name}``.

A worker is online when it was seen in the last five minutes (AI Horde's staleness limit): an
HTTP worker at each pop (``workers.last_seen_at``), an AMQP worker at each heartbeat
(``worker_uptime.last_seen``). Its counters come from the jobs it finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Header, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from api import stats
from api.deps import HordeDep
from api.errors import InvalidAPIKey, WorkerNotFound
from api.jobs import CLAIMED, DONE
from api.schemas import ErrorBody
from api.tables import jobs, users, worker_uptime, workers
from config.database import as_utc, utcnow
from ledger.units import to_kudos

router = APIRouter(prefix="/api/v2/workers", tags=["workers"])

STALE_AFTER = timedelta(seconds=300)
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 404)}


class WorkerKudosDetails(BaseModel):
    generated: float = 0
    uptime: int = 0


class WorkerDetails(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    name: str
    type: str = Field(description="image or text")
    online: bool
    requests_fulfilled: int
    kudos_rewards: float
    kudos_details: WorkerKudosDetails
    performance: str
    threads: int
    uptime: int = Field(description="Seconds of the current online streak.")
    maintenance_mode: bool = False
    paused: bool = False
    info: str = ""
    nsfw: bool
    trusted: bool = False
    flagged: bool = False
    uncompleted_jobs: int = 0
    models: list[str]
    bridge_agent: str
    max_pixels: int | None = None
    megapixelsteps_generated: int
    img2img: bool = False
    painting: bool = False
    post_processing: bool = Field(False, alias="post-processing")
    lora: bool = False
    controlnet: bool = False
    sdxl_controlnet: bool = False
    owner: str | None = Field(None, description="alias#id; shown to the owner only.")


@dataclass(frozen=True)
class Presence:
    """A worker row with when it was last seen (by pop or heartbeat) and its streak start."""

    row: Any
    last_seen: datetime | None
    streak_start: datetime | None

    def online(self, now: datetime) -> bool:
        return self.last_seen is not None and now - self.last_seen <= STALE_AFTER


def _latest(*values: datetime | None) -> datetime | None:
    present = [as_utc(v) for v in values if v is not None]
    return max(present) if present else None  # type: ignore[type-var]


async def presences(conn: AsyncConnection, where: sa.ColumnElement[bool] | None = None) -> list[Presence]:
    query = (sa.select(workers, users.c.alias.label("owner_alias"), worker_uptime.c.last_seen,
                       worker_uptime.c.streak_start)
             .select_from(workers.join(users, users.c.id == workers.c.owner_id)
                          .outerjoin(worker_uptime, worker_uptime.c.worker_id == workers.c.id))
             .order_by(workers.c.id))
    if where is not None:
        query = query.where(where)
    rows = await conn.execute(query)
    return [Presence(r, _latest(r.last_seen_at, r.last_seen), as_utc(r.streak_start)) for r in rows]


async def online_presences(conn: AsyncConnection, now: datetime) -> list[Presence]:
    since = now - STALE_AFTER
    return [p for p in await presences(conn, (workers.c.last_seen_at >= since) | (worker_uptime.c.last_seen >= since))
            if p.online(now)]


@dataclass
class Counters:
    done: int = 0
    units: int = 0  # price of the jobs done: what the owner earned for them
    megapixelsteps: float = 0.0
    seconds: float = 0.0  # claim to completion, summed
    held: int = 0


async def _job_counters(conn: AsyncConnection, worker_ids: list[int]) -> dict[int, Counters]:
    out = {i: Counters() for i in worker_ids}
    if not worker_ids:
        return out
    rows = await conn.execute(
        sa.select(jobs.c.worker_id, jobs.c.state, sa.func.count(), sa.func.sum(jobs.c.price),
                  sa.func.sum(stats.megapixelsteps()), sa.func.sum(stats.generation_seconds(conn.dialect.name)))
        .where(jobs.c.worker_id.in_(worker_ids), jobs.c.state.in_([DONE, CLAIMED]))
        .group_by(jobs.c.worker_id, jobs.c.state))
    for worker_id, state, count, price, mps, seconds in rows:
        c = out[worker_id]
        if state == DONE:
            c.done, c.units = count, int(price or 0)
            c.megapixelsteps, c.seconds = float(mps or 0), float(seconds or 0)
        else:
            c.held = count
    return out


def _details(p: Presence, c: Counters, *, now: datetime, owner_view: bool) -> WorkerDetails:
    row = p.row
    online = p.online(now)
    streak = int((now - p.streak_start).total_seconds()) if online and p.streak_start else 0
    speed = c.megapixelsteps / c.seconds if c.seconds > 0 else 0.0
    return WorkerDetails(
        id=str(row.id), name=row.name, type=row.kind or "image", online=online, requests_fulfilled=c.done,
        kudos_rewards=to_kudos(c.units), kudos_details=WorkerKudosDetails(generated=to_kudos(c.units)),
        performance=f"{speed:.2f} megapixelsteps per second",
        threads=row.threads or 1, uptime=max(streak, 0), info=row.info or "", nsfw=bool(row.nsfw),
        uncompleted_jobs=c.held, models=list(row.models or []), bridge_agent=row.bridge_agent or "",
        max_pixels=row.max_pixels, megapixelsteps_generated=int(c.megapixelsteps),
        maintenance_mode=bool(row.maintenance) or row.suspended_at is not None, paused=bool(row.paused),
        flagged=bool(row.flagged),
        owner=f"{row.owner_alias}#{row.owner_id}" if owner_view else None,
    )


async def _caller_id(h: HordeDep, apikey: str | None) -> int | None:
    if not apikey:
        return None
    try:
        account = await h.auth.account(apikey)
    except InvalidAPIKey:
        return None
    return None if account.anonymous else account.id


async def _render(h: HordeDep, found: list[Presence], apikey: str | None) -> list[WorkerDetails]:
    caller = await _caller_id(h, apikey)
    now = utcnow()
    async with h.engine.connect() as conn:
        counters = await _job_counters(conn, [p.row.id for p in found])
    return [_details(p, counters[p.row.id], now=now, owner_view=caller == p.row.owner_id) for p in found]


@router.get("", response_model=list[WorkerDetails], response_model_exclude_none=True, responses=ERRORS)
async def list_workers(h: HordeDep, type: Annotated[str, Query(max_length=20)] = "",  # noqa: A002 - AI Horde's name
                       name: Annotated[str | None, Query(max_length=100)] = None,
                       apikey: Annotated[str | None, Header()] = None) -> list[WorkerDetails]:
    """The workers online now (seen in the last five minutes); ``type`` image|text, ``name`` exact."""
    async with h.engine.connect() as conn:
        found = await online_presences(conn, utcnow())
    if name:
        found = [p for p in found if p.row.name.lower() == name.lower()]
    elif type in ("image", "text"):
        found = [p for p in found if (p.row.kind or "image") == type]
    elif type:
        found = []  # interrogation workers: this horde has none
    return await _render(h, found, apikey)


@router.get("/name/{worker_name}", response_model=WorkerDetails, response_model_exclude_none=True, responses=ERRORS)
async def worker_by_name(worker_name: str, h: HordeDep,
                         apikey: Annotated[str | None, Header()] = None) -> WorkerDetails:
    """One worker by name, online or not."""
    if len(worker_name) > 100 or "\x00" in worker_name:
        raise WorkerNotFound("No worker has such a name.")
    async with h.engine.connect() as conn:
        found = await presences(conn, workers.c.name == worker_name)
    if not found:
        raise WorkerNotFound(f"No worker named {worker_name!r}.")
    return (await _render(h, found, apikey))[0]


@router.get("/{worker_id}", response_model=WorkerDetails, response_model_exclude_none=True, responses=ERRORS)
async def worker_by_id(worker_id: str, h: HordeDep, apikey: Annotated[str | None, Header()] = None) -> WorkerDetails:
    """One worker by id, online or not."""
    if not (worker_id.isascii() and worker_id.isdigit()) or len(worker_id) > 9:
        raise WorkerNotFound(f"No worker with id {worker_id!r}.")
    async with h.engine.connect() as conn:
        found = await presences(conn, workers.c.id == int(worker_id))
    if not found:
        raise WorkerNotFound(f"No worker with id {worker_id!r}.")
    return (await _render(h, found, apikey))[0]
