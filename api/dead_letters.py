"""Dead letters: every message a consumer refused, recorded for admins; dropped jobs put back at once.

Consumers reject what they cannot use (malformed, wrong type, forged sender) with
``requeue=False``; the queues' dead-letter exchange routes it to ``horde.dead``. The API consumes
that queue: each message becomes a row of ``dead_letters`` (where it died, why, who sent it, the
start of its body) and one WARNING line, then it is acked.

A job message a worker *rejected* from a job queue, while the job is still ``queued``, is a job
a broken or vandal worker dropped: it is republished at once from the database row (never from
the dead letter's body), instead of waiting for the reconciler's count. A job can be put back
this way ``REPUBLISH_LIMIT`` times: a worker rejecting everything cannot make a loop of it, and
the reconciler still republishes the job later. Copies are harmless (claims grant a job once).

``GET /api/v2/admin/dead-letters`` lists the rows, newest first, paged (admin role).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from aio_pika.abc import AbstractIncomingMessage
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api.deps import AdminDep, HordeDep
from api.dispatch import publish_job
from api.jobs import QUEUED, job_message
from api.tables import dead_letters, jobs
from broker.amqp import DEAD_QUEUE_HEADER, DEAD_REASON_HEADER, DEAD_SENDER_HEADER, Publisher
from broker.errors import BrokerError
from broker.messages import BadMessage, JobMessage, decode
from broker.topology import JOBS_EXCHANGE
from config.database import as_utc, utcnow

log = logging.getLogger(__name__)

#: Characters of a body kept in the table: enough to see what it was, never a whole image.
BODY_CHARS = 2000
REPUBLISH_LIMIT = 5
RECORDED, REPUBLISHED, NOT_REPUBLISHED = "recorded", "republished", "not-republished"


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    routing_key: str
    reason: str
    message_id: str | None
    type: str | None
    user_id: str | None
    body: bytes


def _text(value: Any, limit: int) -> str:
    """Printable text for a column: bytes decoded leniently, NUL (which PostgreSQL refuses) escaped."""
    text = value[:limit * 4].decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.replace("\x00", "\\x00")[:limit]


def _optional(value: str | None, limit: int) -> str | None:
    return None if value is None else _text(value, limit)


def read_letter(message: AbstractIncomingMessage) -> DeadLetter:
    """Where and why a message died, from its newest ``x-death`` entry (absent: published here directly)."""
    headers = message.headers or {}
    deaths = headers.get("x-death") or []
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    sender = message.user_id
    if not death and DEAD_QUEUE_HEADER in headers:  # dead-lettered by the horde itself (heartbeats)
        death = {"queue": headers[DEAD_QUEUE_HEADER], "reason": headers.get(DEAD_REASON_HEADER, "?")}
        sender = str(headers.get(DEAD_SENDER_HEADER) or "") or None
    return DeadLetter(
        queue=_text(death.get("queue", "?"), 255), reason=_text(death.get("reason", "?"), 40),
        routing_key=_text(message.routing_key or "", 255), message_id=_optional(message.message_id, 255),
        type=_optional(message.type, 100), user_id=_optional(sender, 100), body=message.body,
    )


def dropped_job(letter: DeadLetter) -> JobMessage | None:
    """The job a worker dropped, if this letter is one: a valid job message rejected from a job queue."""
    if letter.reason != "rejected" or not letter.queue.startswith(JOBS_EXCHANGE + "."):
        return None
    try:
        return decode(JobMessage, letter.body, letter.type)
    except BadMessage:
        return None


class DeadLetterDesk:
    """The ``horde.dead`` consumer of one API process."""

    def __init__(self, engine: AsyncEngine, publisher: Publisher, *, republish_limit: int = REPUBLISH_LIMIT) -> None:
        self._engine = engine
        self._publisher = publisher
        self._limit = republish_limit
        #: Dead letters are rare: one at a time keeps the republish count exact within a process
        #: (several API processes may each put a job back once more than the limit, harmlessly).
        self._one_at_a_time = asyncio.Lock()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        letter = read_letter(message)
        try:
            async with self._one_at_a_time:
                action = await self._act(letter)
                await self._record(letter, action)
        except (SQLAlchemyError, BrokerError, OSError) as exc:
            log.error("dead letter %s from %s not recorded yet (%s); retrying", letter.message_id, letter.queue, exc)
            await asyncio.sleep(1.0)  # the database or broker is away: don't spin on it
            await message.nack(requeue=True)
            return
        log.warning("dead letter from %s (%s): type=%s message_id=%s user=%s key=%s -> %s", letter.queue,
                    letter.reason, letter.type, letter.message_id, letter.user_id, letter.routing_key, action)
        await message.ack()

    async def _act(self, letter: DeadLetter) -> str:
        job = dropped_job(letter)
        if job is None:
            return RECORDED
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job.job_id))).first()
            if row is None or row.state != QUEUED:
                return RECORDED
            times = (await conn.execute(sa.select(sa.func.count()).select_from(dead_letters).where(
                dead_letters.c.message_id == job.job_id, dead_letters.c.action == REPUBLISHED))).scalar_one()
        if times >= self._limit:
            return NOT_REPUBLISHED
        await publish_job(self._publisher, job_message(row))
        return REPUBLISHED

    async def _record(self, letter: DeadLetter, action: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(dead_letters.insert().values(
                received_at=utcnow(), queue=letter.queue, routing_key=letter.routing_key, reason=letter.reason,
                message_id=letter.message_id, type=letter.type, user_id=letter.user_id,
                body=_text(letter.body, BODY_CHARS), action=action,
            ))


# --- the admins' view ----------------------------------------------------------------------------

router = APIRouter(prefix="/api/v2/admin", tags=["admin"])


class DeadLetterRow(BaseModel):
    id: int
    time: str = Field(description="When the horde received it (ISO 8601, UTC).")
    queue: str = Field(description="The queue it died in.")
    routing_key: str
    reason: str = Field(description="rejected, expired, maxlen, ...")
    message_id: str | None
    type: str | None
    user_id: str | None = Field(description="The AMQP user that published it.")
    body: str = Field(description=f"The first {BODY_CHARS} characters of the body.")
    action: str = Field(description=f"{RECORDED}, {REPUBLISHED} (a dropped job put back) or {NOT_REPUBLISHED}.")


class DeadLetterPage(BaseModel):
    page: int
    per_page: int
    has_more: bool
    dead_letters: list[DeadLetterRow]


@router.get("/dead-letters", response_model=DeadLetterPage)
async def list_dead_letters(h: HordeDep, _: AdminDep, page: Annotated[int, Query(ge=1, le=100_000)] = 1,
                            per_page: Annotated[int, Query(ge=1, le=500)] = 50,
                            queue: Annotated[str | None, Query(max_length=255)] = None) -> DeadLetterPage:
    query = sa.select(dead_letters).order_by(dead_letters.c.id.desc())
    if queue is not None:
        query = query.where(dead_letters.c.queue == queue)
    async with h.engine.connect() as conn:
        rows = (await conn.execute(query.offset((page - 1) * per_page).limit(per_page + 1))).all()
    return DeadLetterPage(page=page, per_page=per_page, has_more=len(rows) > per_page, dead_letters=[
        DeadLetterRow(id=r.id, time=as_utc(r.received_at).isoformat(), queue=r.queue, routing_key=r.routing_key,
                      reason=r.reason, message_id=r.message_id, type=r.type, user_id=r.user_id, body=r.body,
                      action=r.action)
        for r in rows[:per_page]
    ])
