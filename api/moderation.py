"""What moderators act on: the moderation log, flagged accounts and timed-out IPs.

- ``record`` writes one ``moderation_log`` row (corrupt prompts here; the broker watchdog and the
  results service write theirs with it too).
- A corrupt prompt (api/prompt_guard.py) flags the account (``users.flagged``), logs the request
  with its IP, and times the IP out. The shared anonymous account is never flagged (that would
  mark every anonymous client); its abuser is known by the IP, which is logged and timed out.
- IP timeouts grow: ``base x 2^(hits-1)``, capped; hits older than a day are forgotten (AI Horde
  counts the hits of the last 24 h). While timed out, an IP's submissions get 403 ``TimeoutIP``.
  Each API process keeps the timed-out IPs in memory, re-read every few seconds, so checking one
  costs no query; a hit on another process shows here within that refresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.accounts import Account
from api.errors import CorruptPrompt, TimeoutIP
from api.prompt_guard import Match
from api.tables import ip_timeouts, moderation_log, users, workers
from config.database import utcnow

log = logging.getLogger(__name__)

CORRUPT_PROMPT = "corrupt_prompt"
HIT_MEMORY = timedelta(hours=24)
MAX_LOGGED_PROMPT = 10_000  # characters of a prompt kept in the log (a text prompt can be 500 000)


async def record(conn: AsyncConnection, kind: str, *, user_id: int | None = None, worker_id: int | None = None,
                 ip: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Append a row to the moderation log, in the caller's transaction."""
    await conn.execute(sa.insert(moderation_log).values(
        created_at=utcnow(), kind=kind, user_id=user_id, worker_id=worker_id, ip=ip, detail=detail or {}))


async def record_offence(engine: AsyncEngine, kind: str, detail: dict[str, object], *, worker_id: int | None = None,
                         amqp_user: str | None = None) -> int | None:
    """Write ``kind`` to the moderation log and add a strike to the worker who sent it: ``worker_id``,
    or the one worker logging in as ``amqp_user`` (none when several share it, as the horde's own
    user in a development horde). Returns the worker struck."""
    async with engine.begin() as conn:
        if worker_id is None and amqp_user:
            found = (await conn.execute(sa.select(workers.c.id).where(workers.c.amqp_user == amqp_user)
                                        .limit(2))).scalars().all()
            worker_id = found[0] if len(found) == 1 else None
        if worker_id is not None:
            await conn.execute(sa.update(workers).where(workers.c.id == worker_id)
                               .values(strikes=workers.c.strikes + 1))
        await record(conn, kind, worker_id=worker_id, detail={"amqp_user": amqp_user, **detail})
    return worker_id


def backoff(hits: int, *, base_seconds: float, max_seconds: float) -> timedelta:
    """How long the ``hits``-th hit (1, 2, …) times an IP out: base, 2 x base, 4 x base, … up to max."""
    exponent = min(max(hits, 1) - 1, 40)  # 2^40 x base is past any sensible cap; keeps the float finite
    return timedelta(seconds=min(max_seconds, base_seconds * 2**exponent))


def next_hits(previous_hits: int, last_hit: datetime | None, now: datetime) -> int:
    """Hits counting this one; the earlier ones count only if the last was within a day."""
    if last_hit is None or now - last_hit > HIT_MEMORY:
        return 1
    return previous_hits + 1


class Moderation:
    """Corrupt-prompt countermeasures and the per-process cache of timed-out IPs."""

    def __init__(self, engine: AsyncEngine, *, base_seconds: float, max_seconds: float, refresh_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._base = base_seconds
        self._max = max_seconds
        self._refresh = refresh_seconds
        self._clock = clock
        self._blocked: dict[str, datetime] = {}
        self._read_at = float("-inf")

    async def check_ip(self, ip: str) -> None:
        """403 TimeoutIP while ``ip`` is timed out."""
        if self._clock() - self._read_at >= self._refresh:
            await self._reload()
        until = self._blocked.get(ip)
        if until is None:
            return
        left = (until - utcnow()).total_seconds()
        if left > 0:
            raise TimeoutIP(f"Your IP address is timed out for {left:.0f} s after corrupt prompts.",
                            retry_after=left)

    async def _reload(self) -> None:
        self._read_at = self._clock()  # first, so concurrent requests do not all reload
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(ip_timeouts.c.ip, ip_timeouts.c.blocked_until)
                                      .where(ip_timeouts.c.blocked_until > utcnow()))
            self._blocked = {row.ip: _aware(row.blocked_until) for row in rows}

    async def corrupt_prompt(self, match: Match, *, account: Account, ip: str, prompt: str, kind: str,
                             models: list[str]) -> CorruptPrompt:
        """Flag, log and time out; returns the error to answer (the caller raises it)."""
        now = utcnow()
        async with self._engine.begin() as conn:
            if not account.anonymous:
                await conn.execute(sa.update(users).where(users.c.id == account.id).values(flagged=True))
            hits, until = await self._time_out(conn, ip, now)
            await record(conn, CORRUPT_PROMPT, user_id=account.id, ip=ip, detail={
                "prompt": prompt[:MAX_LOGGED_PROMPT], "prompt_chars": len(prompt), "kind": kind, "models": models,
                "user": account.username, "matched": match.matched, "ip_hits": hits,
                "ip_blocked_until": until.isoformat()})
        self._blocked[ip] = until
        log.warning("corrupt prompt from %s at %s (IP hit %d, timed out until %s); flagged and logged",
                    account.username, ip, hits, until.isoformat(timespec="seconds"))
        return CorruptPrompt("This prompt appears to violate our terms of service: it has been logged, and "
                             "your account and IP address flagged.")

    async def _time_out(self, conn: AsyncConnection, ip: str, now: datetime) -> tuple[int, datetime]:
        for _ in range(2):  # a second pass if another process inserted the same new IP meanwhile
            row = (await conn.execute(sa.select(ip_timeouts).where(ip_timeouts.c.ip == ip).with_for_update())).first()
            hits = next_hits(row.hits if row else 0, _aware(row.updated_at) if row else None, now)
            until = now + backoff(hits, base_seconds=self._base, max_seconds=self._max)
            values = {"hits": hits, "blocked_until": until, "updated_at": now}
            if row is not None:
                await conn.execute(sa.update(ip_timeouts).where(ip_timeouts.c.ip == ip).values(**values))
                return hits, until
            try:
                async with conn.begin_nested():
                    await conn.execute(sa.insert(ip_timeouts).values(ip=ip, **values))
                return hits, until
            except IntegrityError:
                continue
        raise RuntimeError(f"could not record the timeout of {ip}")


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; the horde's are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
