"""Aging: a queued job rises a tier for each ``aging_seconds`` waited since its last publish
(api/reconciler.tier_raises), and a tick's raises are one UPDATE per step, not one per job
(api/job_store.raise_tiers), on PostgreSQL and SQLite. tests/test_economy_e2e.py runs it in a horde."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from api import job_store
from api.jobs import CLAIMED, QUEUED
from api.reconciler import tier_raises
from api.tables import jobs
from config.database import as_utc
from tests import services

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def waiting(job_id: str, tier: int, published_at: datetime) -> Any:
    return SimpleNamespace(id=job_id, tier=tier, published_at=published_at)


def test_a_tier_per_step_waited_since_the_last_publish_up_to_the_highest() -> None:
    jobs_ = [
        waiting("two-steps", 0, at(0)),
        waiting("not-yet", 1, at(200)),  # raised 50 s ago: the wait counts from there
        waiting("capped", 3, at(0)),  # would be 5: the highest tier is 4
        waiting("sqlite", 0, at(140).replace(tzinfo=None)),  # SQLite's naive UTC
    ]
    assert tier_raises(jobs_, at(250), 100) == [("two-steps", 0, 2), ("capped", 3, 4), ("sqlite", 0, 1)]
    assert tier_raises(jobs_, at(250), 0) == []  # aging off


async def test_a_ticks_raises_are_one_update_per_step_and_leave_moved_jobs_alone(fresh_engine: Any) -> None:
    ids = await services.insert_queued(fresh_engine, [(0, at(0))] * 4 + [(1, at(0))] * 2)
    async with fresh_engine.begin() as conn:  # since the candidates were read: one claimed, one aged
        await conn.execute(sa.update(jobs).where(jobs.c.id == ids[3]).values(state=CLAIMED))
        await conn.execute(sa.update(jobs).where(jobs.c.id == ids[5]).values(tier=2))
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            updates.append(statement)

    sa.event.listen(fresh_engine.sync_engine, "before_cursor_execute", count)
    raises = [(ids[0], 0, 1), (ids[1], 0, 1), (ids[2], 0, 2), (ids[3], 0, 1), (ids[4], 1, 2), (ids[5], 1, 2)]
    async with fresh_engine.begin() as conn:
        raised = await job_store.raise_tiers(conn, raises, at(300))
    sa.event.remove(fresh_engine.sync_engine, "before_cursor_execute", count)

    assert {row.id: row.tier for row in raised} == {ids[0]: 1, ids[1]: 1, ids[2]: 2, ids[4]: 2}
    assert {as_utc(row.published_at) for row in raised} == {at(300)}
    assert len(updates) == 3  # the steps 0->1, 0->2 and 1->2
    async with fresh_engine.connect() as conn:
        rows = {row.id: row for row in await conn.execute(sa.select(jobs).where(jobs.c.id.in_(ids)))}
    assert (rows[ids[3]].state, rows[ids[3]].tier) == (CLAIMED, 0)  # taken meanwhile: not raised
    assert (rows[ids[5]].state, rows[ids[5]].tier, as_utc(rows[ids[5]].published_at)) == (QUEUED, 2, at(0))
