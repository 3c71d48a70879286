"""Requesters' balances for priority, cached briefly so the accept path rarely reads the ledger."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from api.accounts import Account
from ledger.tables import balances
from ledger.tiers import priority_tier
from ledger.units import to_kudos


class PriorityDesk:
    def __init__(self, engine: AsyncEngine, *, ttl: float = 5.0) -> None:
        self._engine = engine
        self._ttl = ttl
        self._cache: dict[int, tuple[float, float]] = {}

    async def balance(self, account: Account) -> float:
        hit = self._cache.get(account.id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        async with self._engine.connect() as conn:
            units = (await conn.execute(
                sa.select(balances.c.balance).where(balances.c.account_id == account.id)
            )).scalar_one_or_none()
        kudos = to_kudos(units or 0)
        self._cache[account.id] = (time.monotonic() + self._ttl, kudos)
        return kudos

    async def tier(self, account: Account) -> int:
        if account.anonymous:
            return priority_tier(0, anonymous=True)
        return priority_tier(await self.balance(account))
