"""Queue positions for the status calls: from a per-process snapshot of the queued jobs' order,
re-read at most every ``max_age`` seconds (api/queue_positions.py), on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from api import queue_positions
from api.jobs import CLAIMED
from api.queue_positions import QueuePositions, QueueSnapshot
from api.tables import jobs
from tests import services

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- pure: the snapshot -----------------------------------------------------------------------------


def snapshot_of(queued: list[tuple[int, datetime]], stride: int = 1) -> QueueSnapshot:
    """What the database hands over for these queued jobs: every ``stride``-th of each tier, in order."""
    ordered = sorted(queued, key=lambda job: (job[0], job[1]))
    counts = {tier: sum(1 for t, _ in ordered if t == tier) for tier, _ in ordered}
    samples, seen = [], dict.fromkeys(counts, 0)
    for tier, created_at in ordered:
        if seen[tier] % stride == 0:
            samples.append((tier, created_at, counts[tier]))
        seen[tier] += 1
    return QueueSnapshot(samples, stride)


def exact(queued: list[tuple[int, datetime]], tier: int, created_at: datetime) -> int:
    return sum(1 for t, c in queued if t > tier or (t == tier and c < created_at))


def test_higher_tiers_then_older_jobs_come_first() -> None:
    snapshot = snapshot_of([(0, at(1)), (0, at(2)), (0, at(3)), (2, at(5)), (2, at(9)), (4, at(7))])
    assert snapshot.size == 6
    assert snapshot.position(4, at(7)) == 0  # the only job of the top tier
    assert snapshot.position(2, at(5)) == 1  # after the tier-4 job
    assert snapshot.position(2, at(9)) == 2
    assert snapshot.position(0, at(1)) == 3  # every higher-tier job first, however new
    assert snapshot.position(0, at(3)) == 5
    # A job the snapshot has not seen (queued since): everything in it that is served first.
    assert snapshot.position(0, at(99)) == 6
    assert snapshot.position(1, at(0)) == 3  # a tier with no job in the snapshot
    assert snapshot.position(3, at(0)) == 1


def test_jobs_created_in_the_same_instant_are_not_ahead_of_each_other() -> None:
    snapshot = snapshot_of([(0, at(1)), (0, at(1)), (0, at(2))])
    assert snapshot.position(0, at(1)) == 0
    assert snapshot.position(0, at(2)) == 2


def test_naive_times_are_utc_as_sqlite_returns_them() -> None:
    snapshot = QueueSnapshot([(0, at(5).replace(tzinfo=None), 2), (0, at(6), 2)])
    assert snapshot.position(0, at(5)) == 0
    assert snapshot.position(0, at(6).replace(tzinfo=None)) == 1


def test_an_empty_queue_puts_everyone_first() -> None:
    assert QueueSnapshot([]).position(0, at(0)) == 0


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 500)), max_size=300), st.integers(1, 40),
       st.integers(0, 4), st.integers(-5, 505))
def test_a_sampled_snapshot_is_off_by_less_than_its_stride(jobs_: list[tuple[int, int]], stride: int, tier: int,
                                                             second: int) -> None:
    queued = [(t, at(s)) for t, s in jobs_]
    found = snapshot_of(queued, stride).position(tier, at(second))
    assert 0 <= found - exact(queued, tier, at(second)) < stride
    assert snapshot_of(queued).position(tier, at(second)) == exact(queued, tier, at(second))


# --- against a database -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def queue(fresh_engine: Any, *jobs_: tuple[int, float]) -> list[str]:
    """Queued jobs of (tier, seconds after T0); their ids in that order."""
    return await services.insert_queued(fresh_engine, [(tier, at(seconds)) for tier, seconds in jobs_])


async def test_positions_follow_the_queues_order_and_are_re_read_after_max_age(fresh_engine: Any) -> None:
    clock = FakeClock()
    positions = QueuePositions(fresh_engine, max_age=2.0, stale_limit=0, clock=clock)  # 0: never served stale
    _, _, urgent = await queue(fresh_engine, (0, 1), (0, 2), (3, 3))
    assert await positions.position(3, at(3)) == 0
    assert await positions.position(0, at(1)) == 1
    assert await positions.position(0, at(2)) == 2

    # Within max_age the snapshot stands: the urgent job taken by a worker still counts, a job
    # queued since is not seen by others (and sees every job of the snapshot served before it).
    async with fresh_engine.begin() as conn:
        await conn.execute(sa.update(jobs).where(jobs.c.id == urgent).values(state=CLAIMED))
    await queue(fresh_engine, (0, 0))  # older than the others, so first of tier 0 once seen
    clock.now += 1.9
    assert await positions.position(0, at(1)) == 1
    assert await positions.position(0, at(0)) == 1

    clock.now += 0.2  # 2.1 s: re-read
    assert await positions.position(0, at(0)) == 0
    assert await positions.position(0, at(1)) == 1
    assert await positions.position(0, at(2)) == 2
    assert (await positions.snapshot()).size == 3


async def test_concurrent_calls_share_one_read(fresh_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    await queue(fresh_engine, *((0, float(i)) for i in range(50)))
    positions = QueuePositions(fresh_engine, max_age=60.0)
    reads = 0
    read = positions._read

    async def counted() -> QueueSnapshot:
        nonlocal reads
        reads += 1
        return await read()

    monkeypatch.setattr(positions, "_read", counted)
    found = await asyncio.gather(*(positions.position(0, at(i)) for i in range(50)))
    assert found == list(range(50))
    assert reads == 1


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def position_is(positions: QueuePositions, tier: int, created_at: datetime,
                expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await positions.position(tier, created_at) == expected
    return check


async def test_callers_get_the_last_snapshot_while_a_recent_one_is_re_read(fresh_engine: Any) -> None:
    clock = FakeClock()
    positions = QueuePositions(fresh_engine, max_age=2.0, stale_limit=30.0, clock=clock)
    await queue(fresh_engine, (0, 1), (0, 2))
    assert await positions.position(0, at(2)) == 1  # no snapshot yet: the first call waits for it
    await queue(fresh_engine, (1, 0))  # a higher tier, ahead of both
    clock.now += 2.1
    assert await positions.position(0, at(2)) == 1  # answered at once from the last one…
    await eventually(position_is(positions, 0, at(2), 2))  # …which the read then replaces
    await queue(fresh_engine, (1, 1))
    clock.now += 31  # the last snapshot is too old to serve: the caller waits for the new one
    assert await positions.position(0, at(2)) == 3


async def test_a_failed_background_read_is_logged_and_the_last_snapshot_kept(
        fresh_engine: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    positions = QueuePositions(fresh_engine, max_age=2.0, stale_limit=30.0, clock=clock)
    await queue(fresh_engine, (0, 1), (0, 2))
    assert await positions.position(0, at(2)) == 1
    read = positions._read

    async def broken() -> QueueSnapshot:
        raise sa.exc.OperationalError("SELECT", {}, Exception("database away"))

    monkeypatch.setattr(positions, "_read", broken)
    clock.now += 2.1
    assert await positions.position(0, at(2)) == 1
    async def logged() -> bool:
        return "queue positions not re-read" in caplog.text

    await eventually(logged)
    monkeypatch.setattr(positions, "_read", read)
    await queue(fresh_engine, (2, 0))
    assert await positions.position(0, at(2)) == 1  # still the last one; this call starts a read
    await eventually(position_is(positions, 0, at(2), 2))


async def test_a_failed_read_is_retried_by_the_next_call(fresh_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    await queue(fresh_engine, (0, 1))
    positions = QueuePositions(fresh_engine, max_age=60.0)
    read = positions._read

    async def broken() -> QueueSnapshot:
        raise sa.exc.OperationalError("SELECT", {}, Exception("database away"))

    monkeypatch.setattr(positions, "_read", broken)
    with pytest.raises(sa.exc.OperationalError):
        await positions.position(0, at(1))
    monkeypatch.setattr(positions, "_read", read)
    assert await positions.position(0, at(2)) == 1


async def test_a_big_queue_is_sampled_and_positions_stay_within_the_stride(fresh_engine: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_positions, "SAMPLES", 10)
    queued = [(tier, float(i)) for i in range(120) for tier in (0, 2)]
    await queue(fresh_engine, *queued)
    clock = FakeClock()
    positions = QueuePositions(fresh_engine, max_age=2.0, stale_limit=0, clock=clock)
    sampled = await positions.snapshot()  # the first read counts the queue to choose its stride
    assert (sampled.stride, sampled.size) == (24, 240)
    await queue(fresh_engine, *((0, 200.0 + i) for i in range(60)))
    clock.now += 2.1
    again = await positions.snapshot()  # later reads take the stride from the last snapshot
    assert (again.stride, again.size) == (24, 300)
    jobs_ = [(tier, at(seconds)) for tier, seconds in queued]
    for tier, seconds in ((0, 0), (0, 57.5), (0, 119), (2, 33), (2, 200)):
        found = await positions.position(tier, at(seconds))
        assert 0 <= found - exact(jobs_, tier, at(seconds)) < 24
