"""api.grouping: what arrives while a group is processed forms the next group, within the limits."""

from __future__ import annotations

import asyncio

from api.grouping import Groups


def test_items_arriving_meanwhile_form_the_next_group_within_size_and_flight_limits() -> None:
    async def scenario() -> tuple[list[list[int]], int]:
        seen: list[list[int]] = []
        running, most = 0, 0
        gate = asyncio.Event()

        async def process(group: list[int]) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            seen.append(group)
            await gate.wait()
            running -= 1

        groups: Groups[int] = Groups(process, max_size=5, max_in_flight=2, size=lambda n: n)
        groups.add(1)  # alone: starts at once, no timer
        groups.add(2)  # a second group may run beside it
        await asyncio.sleep(0)
        for n in (1, 1, 1, 1, 1, 4, 3):  # these wait, then go in groups of weight <= 5
            groups.add(n)
        await asyncio.sleep(0)
        assert seen == [[1], [2]]
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        return seen, most

    seen, most = asyncio.run(scenario())
    assert seen == [[1], [2], [1, 1, 1, 1, 1], [4], [3]]
    assert most == 2


def test_an_item_heavier_than_the_limit_still_goes_alone() -> None:
    async def scenario() -> list[list[int]]:
        seen: list[list[int]] = []

        async def process(group: list[int]) -> None:
            seen.append(group)

        groups: Groups[int] = Groups(process, max_size=3, max_in_flight=1, size=lambda n: n)
        for n in (7, 1, 1):
            groups.add(n)
        for _ in range(10):
            await asyncio.sleep(0)
        return seen

    assert asyncio.run(scenario()) == [[7], [1, 1]]
