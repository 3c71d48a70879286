"""Roles: admin, moderator, trusted. Stored on the user row; checked on admin endpoints and claims.

- admin: grants and revokes kudos and roles, reads the ledger reports.
- moderator: (moderation tools come with the anti-abuse work).
- trusted: workers of a trusted owner may serve requests with ``trusted_workers: true``.
The first admin is made on the command line: ``horde admin role NAME admin``.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from api.accounts import Account
from api.errors import HordeError
from api.tables import users

ROLES = ("admin", "moderator", "trusted")


class Forbidden(HordeError):
    status, rc = 403, "Forbidden"


def parse_roles(text: str | None) -> frozenset[str]:
    return frozenset(r for r in (text or "").split(",") if r)


def format_roles(roles: frozenset[str]) -> str:
    return ",".join(sorted(roles))


def set_role(conn: Connection, user_id: int, role: str, *, granted: bool) -> frozenset[str]:
    """Grant or revoke ``role``; returns the user's roles after the change."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    current = parse_roles(conn.execute(sa.select(users.c.roles).where(users.c.id == user_id)).scalar_one())
    updated = current | {role} if granted else current - {role}
    conn.execute(sa.update(users).where(users.c.id == user_id).values(roles=format_roles(updated)))
    return updated


class RoleBook:
    """Roles by account id, cached for a few seconds (a revoked admin loses access within the TTL)."""

    def __init__(self, engine: AsyncEngine, *, ttl: float = 5.0) -> None:
        self._engine = engine
        self._ttl = ttl
        self._cache: dict[int, tuple[float, frozenset[str]]] = {}

    async def roles(self, account: Account) -> frozenset[str]:
        hit = self._cache.get(account.id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        async with self._engine.connect() as conn:
            text = (await conn.execute(sa.select(users.c.roles).where(users.c.id == account.id))).scalar_one_or_none()
        roles = parse_roles(text)
        self._cache[account.id] = (time.monotonic() + self._ttl, roles)
        return roles

    def forget(self, account_id: int) -> None:
        """Drop a cached entry, so a change made by this process applies at once."""
        self._cache.pop(account_id, None)
