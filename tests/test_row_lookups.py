"""Statements that move a job by its id find it by primary key, even when PostgreSQL's statistics
predate the rows they look for (a fresh table, a burst of jobs since the last ANALYZE, a new worker).

With such statistics, ``id = … AND state = 'queued'`` is costed the same through ``ix_jobs_state_*``
(or ``ix_jobs_worker_*``) as through the primary key, and PostgreSQL may scan every queued job to
update one: the dispatcher's lease did, at 2.5 ms a lease under a backlog (docs/benchmarks.md).
``api.tables.unindexed`` writes the other tests so that no index can serve them. PostgreSQL only:
the premise is PostgreSQL's planner."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api import job_store
from api.claims import _LEASE, _LEASE_ONE
from api.jobs import CLAIMED, DONE, QUEUED
from api.tables import ANONYMOUS_USER_ID, jobs
from config.database import make_async_engine
from tests import services

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
#: The job every statement below addresses: one of many queued that the statistics do not know of.
TARGET = str(uuid.uuid4())
#: The scan that finds the statement's own rows (``on jobs`` with no alias: not the lease cap's ``mine``).
_OWN_SCAN = re.compile(r"Scan using (\w+) on jobs +\(")


def _rows(n: int, state: str, first_id: str | None = None) -> list[dict[str, Any]]:
    ids = [first_id] if first_id else []
    ids += [str(uuid.uuid4()) for _ in range(n - len(ids))]
    return [{"id": job_id, "request_id": str(uuid.uuid4()), "user_id": ANONYMOUS_USER_ID, "kind": "image",
             "models": ["tiny"], "payload": {}, "tier": 0, "price": 1, "state": state, "attempts": 0,
             "created_at": NOW, "published_at": NOW} for job_id in ids]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[AsyncEngine]:
    """2,000 done jobs, then ANALYZE, then 3,000 queued ones that the statistics never saw."""
    with services.migrated_database("postgresql") as url:
        engine = make_async_engine(url)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ALTER TABLE jobs SET (autovacuum_enabled = false)")
            await conn.execute(sa.insert(jobs), _rows(2000, DONE))
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ANALYZE jobs")
            await conn.execute(sa.insert(jobs), _rows(3000, QUEUED, first_id=TARGET))
        yield engine
        await engine.dispose()


async def _plans(engine: AsyncEngine, run: Callable[[AsyncConnection], Awaitable[Any]]) -> list[str]:
    """The plan of every UPDATE or DELETE that ``run`` sends, for its first row of parameters
    (rolled back: the table stays as the fixture made it)."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "DELETE")):
            sent.append((statement, parameters[0] if many else parameters))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with engine.connect() as conn:
            await run(conn)
            plans = ["\n".join((await conn.exec_driver_sql("EXPLAIN " + statement, parameters)).scalars())
                     for statement, parameters in sent]
            await conn.rollback()
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert plans, "the call sent no UPDATE or DELETE"
    return plans


def _lease_binds() -> dict[str, Any]:
    return {"b_job": TARGET, "b_worker": 1, "b_lease": str(uuid.uuid4()), "b_model": "tiny",
            "b_deadline": NOW, "b_now": NOW, "b_max": 3}


def _completion(*, late: bool) -> job_store.Completion:
    return job_store.Completion(job_id=TARGET, worker_id=1, lease_id="lease", seed="1", censored=False,
                                result_path="/r", late=late)


CALLS: dict[str, Callable[[AsyncConnection], Awaitable[Any]]] = {
    "lease one": lambda conn: conn.execute(_LEASE_ONE, _lease_binds()),
    "lease a round": lambda conn: conn.execute(_LEASE, [_lease_binds(), _lease_binds()]),
    "release": lambda conn: job_store.release(conn, job_id=TARGET, lease_id="lease", max_attempts=3,
                                              reason="test", now=NOW, worker_id=1),
    "give back": lambda conn: job_store.give_back(conn, job_id=TARGET, lease_id="lease", worker_id=1, now=NOW),
    "raise a tier": lambda conn: job_store.raise_tiers(conn, [(TARGET, 0, 1)], NOW),
    "complete": lambda conn: job_store.complete_many(conn, [_completion(late=False)], NOW),
    "complete late": lambda conn: job_store.complete_many(conn, [_completion(late=True)], NOW),
}


async def test_the_statistics_make_a_plain_state_test_scan_the_queue(engine: AsyncEngine) -> None:
    """The premise: written plainly, one job is looked for among all the queued ones."""
    plans = await _plans(engine, lambda conn: conn.execute(
        sa.update(jobs).where(jobs.c.id == TARGET, jobs.c.state == QUEUED).values(state=CLAIMED)))
    assert _OWN_SCAN.findall(plans[0])[0].startswith("ix_jobs_state"), plans[0]


@pytest.mark.parametrize("name", CALLS)
async def test_a_job_is_found_by_its_primary_key(engine: AsyncEngine, name: str) -> None:
    for plan in await _plans(engine, CALLS[name]):
        assert _OWN_SCAN.findall(plan) == ["jobs_pkey"], plan
