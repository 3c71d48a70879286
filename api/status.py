"""Status endpoints of AI Horde API v2: heartbeat, models, performance, news.

``/status/models`` reports, per model of the reference: ``count``, the workers serving it now
(consumers of its queue, plus HTTP workers seen polling for it in the last five minutes);
``jobs`` and ``queued``, the queued jobs naming it and their work (megapixelsteps; tokens for
text) from the database, the system of record; ``performance``, the work per second of its
jobs finished in the last ten minutes; ``eta``, seconds to clear its queue at that pace.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from api import stats
from api.deps import HordeDep
from api.jobs import DONE, QUEUED
from api.schemas import ErrorBody
from api.state import Horde
from api.tables import HTTP_WORKER_AMQP_USER, jobs
from api.workers import online_presences
from config import ModelKind
from config.database import utcnow

router = APIRouter(prefix="/api/v2/status", tags=["status"])

VERSION = "2.5.0"
RECENT = timedelta(minutes=10)
ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorBody}}


class Heartbeat(BaseModel):
    message: str
    version: str


class ActiveModel(BaseModel):
    name: str
    count: int = Field(description="Workers serving it now.")
    performance: float = Field(description="Megapixelsteps (text: tokens) per second, last ten minutes.")
    queued: float = Field(description="Queued work: megapixelsteps (text: tokens).")
    jobs: float = Field(description="Queued jobs.")
    eta: int = Field(description="Seconds to clear the queue at the recent pace.")
    type: Literal["image", "text"]


class HordePerformance(BaseModel):
    queued_requests: int
    queued_text_requests: int
    worker_count: int
    text_worker_count: int
    thread_count: int
    text_thread_count: int
    queued_megapixelsteps: float
    past_minute_megapixelsteps: float
    queued_tokens: float
    past_minute_tokens: float
    queued_forms: float = 0
    interrogator_count: int = 0
    interrogator_thread_count: int = 0


class Newspiece(BaseModel):
    date_published: str
    newspiece: str
    importance: str
    tags: list[str] = Field(default_factory=list)
    title: str = ""


@router.get("/heartbeat", response_model=Heartbeat)
async def heartbeat() -> Heartbeat:
    """The API process is up and serving."""
    return Heartbeat(message="OK", version=VERSION)


@dataclass
class _Load:
    jobs: int = 0
    work: float = 0.0
    done_work: float = 0.0
    done_seconds: float = 0.0


async def _loads(conn: AsyncConnection, now) -> dict[str, _Load]:  # type: ignore[no-untyped-def]
    loads: dict[str, _Load] = defaultdict(_Load)
    models_text = sa.cast(jobs.c.models, sa.Text)
    for models, count, work in await conn.execute(
            sa.select(models_text, sa.func.count(), sa.func.sum(stats.work())).where(jobs.c.state == QUEUED)
            .group_by(models_text)):
        for model in orjson.loads(models):
            loads[model].jobs += count
            loads[model].work += float(work or 0)
    for model, work, seconds in await conn.execute(
            sa.select(jobs.c.model, sa.func.sum(stats.work()), sa.func.sum(stats.generation_seconds(conn.dialect.name)))
            .where(jobs.c.state == DONE, jobs.c.created_at >= now - RECENT, jobs.c.finished_at >= now - RECENT)
            .group_by(jobs.c.model)):
        if model:
            loads[model].done_work, loads[model].done_seconds = float(work or 0), float(seconds or 0)
    return loads


async def model_stats(h: Horde) -> list[ActiveModel]:
    now = utcnow()
    async with h.engine.connect() as conn:
        loads = await _loads(conn, now)
        online = await online_presences(conn, now)
    http_counts: dict[str, int] = defaultdict(int)
    for presence in online:
        if presence.row.amqp_user == HTTP_WORKER_AMQP_USER:
            for model in presence.row.models or []:
                http_counts[model] += 1
    out = []
    for spec in h.models:
        load = loads.get(spec.name, _Load())
        count = h.reconciler.serving.get(spec.name, 0) + http_counts[spec.name]
        performance = load.done_work / load.done_seconds if load.done_seconds > 0 else 0.0
        if performance > 0:
            eta = load.work / (performance * max(count, 1))
        else:
            eta = load.jobs * h.results.average_seconds / max(count, 1)
        out.append(ActiveModel(name=spec.name, count=count, performance=round(performance, 2),
                               queued=round(load.work, 2), jobs=load.jobs, eta=int(eta), type=spec.kind.value))
    return out


@router.get("/models", response_model=list[ActiveModel], responses=ERRORS)
async def models(h: HordeDep, type: Literal["image", "text"] = "image",  # noqa: A002 - AI Horde's name
                 min_count: Annotated[int | None, Query(ge=0)] = None,
                 max_count: Annotated[int | None, Query(ge=0)] = None,
                 model_state: Literal["all", "known", "custom"] = "all") -> list[ActiveModel]:
    """The models of this horde of one ``type``, with workers, queue and pace; every model is known."""
    if model_state == "custom":
        return []
    return [m for m in await model_stats(h)
            if m.type == type and (min_count is None or m.count >= min_count)
            and (max_count is None or m.count <= max_count)]


@router.get("/models/{model_name}", response_model=list[ActiveModel], responses=ERRORS)
async def model(model_name: str, h: HordeDep) -> list[ActiveModel]:
    """One model's statistics (an empty list for a model this horde does not know)."""
    return [m for m in await model_stats(h) if m.name == model_name]


@router.get("/performance", response_model=HordePerformance)
async def performance(h: HordeDep) -> HordePerformance:
    """Queued work, workers online and the work done in the past minute."""
    now = utcnow()
    async with h.engine.connect() as conn:
        queued = {kind: (count, float(work or 0)) for kind, count, work in await conn.execute(
            sa.select(jobs.c.kind, sa.func.count(), sa.func.sum(stats.work())).where(jobs.c.state == QUEUED)
            .group_by(jobs.c.kind))}
        past = {kind: float(work or 0) for kind, work in await conn.execute(
            sa.select(jobs.c.kind, sa.func.sum(stats.work()))
            .where(jobs.c.state == DONE, jobs.c.created_at >= now - RECENT,
                   jobs.c.finished_at >= now - timedelta(minutes=1))
            .group_by(jobs.c.kind))}
        online = await online_presences(conn, now)
    workers = {kind: [p for p in online if (p.row.kind or "image") == kind] for kind in ("image", "text")}
    image_consumers = max((h.reconciler.serving.get(m, 0) for m in h.models.names(ModelKind.image)), default=0)
    return HordePerformance(
        queued_requests=queued.get("image", (0, 0.0))[0], queued_text_requests=queued.get("text", (0, 0.0))[0],
        worker_count=max(len(workers["image"]), image_consumers), text_worker_count=len(workers["text"]),
        thread_count=max(sum(p.row.threads or 1 for p in workers["image"]), image_consumers),
        text_thread_count=sum(p.row.threads or 1 for p in workers["text"]),
        queued_megapixelsteps=round(queued.get("image", (0, 0.0))[1], 2),
        past_minute_megapixelsteps=round(past.get("image", 0.0), 2),
        queued_tokens=queued.get("text", (0, 0.0))[1], past_minute_tokens=past.get("text", 0.0),
    )


@router.get("/news", response_model=list[Newspiece])
async def news() -> list[Newspiece]:
    """This horde publishes no news."""
    return []
