"""The worker's turns: one at a time, the owner's chosen users first, FIFO among equals."""

from __future__ import annotations

import asyncio

from consumers.turns import Turns


async def _job(turns: Turns, name: str, order: list[str], *, first: bool = False, hold: float = 0.01) -> None:
    async with turns.turn(first=first):
        order.append(name)
        await asyncio.sleep(hold)


def test_one_at_a_time_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        turns, order = Turns(), []
        await asyncio.gather(*(_job(turns, f"j{i}", order) for i in range(4)))
        return order

    assert asyncio.run(scenario()) == ["j0", "j1", "j2", "j3"]


def test_chosen_users_jobs_go_before_waiting_ordinary_jobs() -> None:
    async def scenario() -> list[str]:
        turns, order = Turns(), []
        running = asyncio.create_task(_job(turns, "running", order, hold=0.05))
        await asyncio.sleep(0)
        ordinary = [asyncio.create_task(_job(turns, f"o{i}", order)) for i in range(2)]
        await asyncio.sleep(0)
        favoured = asyncio.create_task(_job(turns, "friend", order, first=True))
        await asyncio.gather(running, *ordinary, favoured)
        return order

    assert asyncio.run(scenario()) == ["running", "friend", "o0", "o1"]


def test_give_way_lets_a_chosen_users_job_claim_before_the_look_ahead_job() -> None:
    async def scenario() -> list[str]:
        turns, order = Turns(), []

        async def look_ahead() -> None:
            async with turns.turn():
                await asyncio.sleep(0.02)  # waiting for claim time
                while turns.first_waiting():
                    await turns.give_way()
                order.append("look-ahead")

        task = asyncio.create_task(look_ahead())
        await asyncio.sleep(0)
        later = asyncio.create_task(_job(turns, "later", order))
        favoured = asyncio.create_task(_job(turns, "friend", order, first=True))
        await asyncio.gather(task, later, favoured)
        return order

    assert asyncio.run(scenario()) == ["friend", "look-ahead", "later"]


def test_a_cancelled_waiter_does_not_wedge_the_turns() -> None:
    async def scenario() -> list[str]:
        turns, order = Turns(), []
        running = asyncio.create_task(_job(turns, "running", order, hold=0.02))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(_job(turns, "doomed", order))
        after = asyncio.create_task(_job(turns, "after", order))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(running, after)
        async with turns.turn():
            order.append("free")
        return order

    assert asyncio.run(scenario()) == ["running", "after", "free"]
