"""ClaimsService.lease: a dispatcher round's leases in one transaction, on real PostgreSQL; and
ClaimsService.insert_leased, the door's new job inserted already leased, on both databases.

Each pick applies only if its job is still queued and its worker in service and under its lease
cap; the others are left for ``grant`` to explain, and nothing else in the round is disturbed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.accounts import WorkerDirectory, WorkerRecord
from api.claims import ClaimsService
from api.jobs import job_message
from api.tables import jobs, users, workers
from broker.messages import ImageParams, JobMessage
from config.database import make_async_engine
from tests import services

NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)
PARAMS = ImageParams(width=64, height=64, steps=4, cfg_scale=7, sampler_name="k_euler", karras=True)


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    with services.migrated_database(prefix="horde_lease_test") as url:
        yield url


async def _owner_and_workers(conn: AsyncConnection, prefix: str, **paused: bool) -> tuple[int, dict[str, int]]:
    """A user owning one worker per keyword (``<prefix>-<name>``, paused or not); their ids."""
    owner = (await conn.execute(sa.insert(users).values(alias="o", created_at=NOW).returning(users.c.id))).scalar_one()
    ids = {name: (await conn.execute(sa.insert(workers).values(
        name=f"{prefix}-{name}", owner_id=owner, amqp_user=name, created_at=NOW, paused=is_paused)
        .returning(workers.c.id))).scalar_one() for name, is_paused in paused.items()}
    return owner, ids


def _claims(engine: AsyncEngine) -> ClaimsService:
    return ClaimsService(engine, None, WorkerDirectory(engine), lease_base_seconds=60,  # type: ignore[arg-type]
                         lease_step_seconds=1, lease_min_seconds=30)


def _job(job_id: str) -> JobMessage:
    return JobMessage(job_id=job_id, request_id="r", kind="image", models=["m"], prompt="a cat", tier=1,
                      created_at=NOW, params=PARAMS)


def test_a_round_leases_what_it_may_and_leaves_the_rest(db_url: str) -> None:
    async def scenario() -> tuple[dict[str, object], dict[str, tuple[str, int | None]]]:
        engine = make_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                owner, ids = await _owner_and_workers(conn, "lease", ready=False, busy=False, idle=False, paused=True)
                job_ids = {k: str(uuid.uuid4()) for k in ("a", "b", "c", "d", "e", "held1", "held2")}
                row = {"request_id": "r", "user_id": owner, "kind": "image", "models": ["m"],
                       "payload": {"params": PARAMS.model_dump()}, "tier": 1, "price": 100,
                       "created_at": NOW, "published_at": NOW}
                await conn.execute(sa.insert(jobs), [
                    {**row, "id": job_ids[k], "state": "queued"} for k in ("a", "b", "c", "d")])
                await conn.execute(sa.insert(jobs), [
                    {**row, "id": job_ids["e"], "state": "done", "worker_id": ids["ready"]},
                    # "busy" already holds two live leases: at a cap of 2 it may not take another.
                    {**row, "id": job_ids["held1"], "state": "claimed", "worker_id": ids["busy"]},
                    {**row, "id": job_ids["held2"], "state": "claimed", "worker_id": ids["busy"]}])
            record = {name: WorkerRecord(wid, f"lease-{name}", owner, name) for name, wid in ids.items()}
            claims = _claims(engine)
            picks = [(_job(job_ids["a"]), "m", record["ready"]),   # leased
                     (_job(job_ids["b"]), "m", record["busy"]),    # at its cap
                     (_job(job_ids["c"]), "m", record["paused"]),  # paused
                     (_job(job_ids["e"]), "m", record["idle"])]    # done already
            granted = await claims.lease(picks, max_leases=2)
            async with engine.connect() as conn:
                states = {k: (r.state, r.worker_id) for k, jid in job_ids.items()
                          for r in await conn.execute(sa.select(jobs.c.state, jobs.c.worker_id)
                                                      .where(jobs.c.id == jid))}
            # A round of one is its own statement; it must say the same.
            alone = await claims.lease([(_job(job_ids["d"]), "m", record["ready"])], max_leases=2)
            assert set(alone) == {job_ids["d"]} and alone[job_ids["d"]].granted
            return {"granted": granted, "ids": job_ids, "workers": ids}, states
        finally:
            await engine.dispose()

    result, states = asyncio.run(scenario())
    granted, job_ids, ids = result["granted"], result["ids"], result["workers"]
    assert set(granted) == {job_ids["a"]}  # type: ignore[arg-type,index]
    reply = granted[job_ids["a"]]  # type: ignore[index]
    assert reply.granted and reply.lease_id and reply.lease_deadline > NOW
    assert states["a"] == ("claimed", ids["ready"])  # type: ignore[index]
    assert states["b"] == ("queued", None) and states["c"] == ("queued", None)
    assert states["e"] == ("done", ids["ready"])  # type: ignore[index]


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_new_job_is_inserted_leased_only_to_a_worker_that_may_lease(kind: str, tmp_path: Path) -> None:
    async def scenario(url: str) -> tuple[dict[str, object], dict[str, tuple[str, int | None, str | None]]]:
        engine = make_async_engine(url)
        try:
            async with engine.begin() as conn:
                owner, ids = await _owner_and_workers(conn, "door", ready=False, full=False, paused=True)
                row = {"request_id": "r", "user_id": owner, "kind": "image", "models": ["m"],
                       "payload": {"prompt": "a cat", "negative_prompt": "", "nsfw": True, "censor_nsfw": False,
                                   "params": PARAMS.model_dump()}, "tier": 1, "price": 100,
                       "state": "queued", "attempts": 0, "created_at": NOW, "published_at": NOW}
                await conn.execute(sa.insert(jobs), [{**row, "id": str(uuid.uuid4()), "state": "claimed",
                                                      "worker_id": ids["full"]}])  # "full" is at a cap of 1
            record = {name: WorkerRecord(wid, f"door-{name}", owner, name) for name, wid in ids.items()}
            claims = _claims(engine)
            replies, new_ids = {}, {}
            async with engine.connect() as conn:
                for name in record:
                    new = {**row, "id": str(uuid.uuid4())}
                    new_ids[name] = new["id"]
                    replies[name] = await claims.insert_leased(conn, new, job_message(new), "m", record[name],
                                                               max_leases=1)
                    await conn.commit()
                found = {name: [(r.state, r.worker_id, r.lease_id) for r in await conn.execute(
                    sa.select(jobs).where(jobs.c.id == job_id))] for name, job_id in new_ids.items()}
            return {"replies": replies, "workers": ids}, {k: v[0] for k, v in found.items() if v}
        finally:
            await engine.dispose()

    with services.migrated_database(kind, tmp_path, prefix="horde_door_test") as url:
        result, rows = asyncio.run(scenario(url))
    replies, ids = result["replies"], result["workers"]
    ready = replies["ready"]  # type: ignore[index]
    assert ready is not None and ready.granted and ready.lease_deadline > NOW
    assert rows["ready"] == ("claimed", ids["ready"], ready.lease_id)  # type: ignore[index]
    # A worker at its cap, or paused, gets no lease, and nothing is inserted: the intake queues it.
    assert replies["full"] is None and replies["paused"] is None  # type: ignore[index]
    assert set(rows) == {"ready"}
