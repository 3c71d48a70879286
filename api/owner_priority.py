"""Owners' priority lists: a worker's owner names users (``alias#id``) that it serves first.

A job of such a user is published twice: to its models' queues as always, and to the own queue
of every worker that lists the user and serves one of its models (``broker.topology.worker_queue``,
declared by the horde at registration). The worker runs the jobs of its own queue before the jobs
the dispatcher offers it (``consumers/worker.py``); whichever copy is leased first wins and the
others are dropped, so the extra copy can only make the job earlier, never doubled.

The lists are read from the database at most every ``ttl`` seconds by one background refresh, so
the accept path never waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from api.tables import HTTP_WORKER_AMQP_USER, workers

log = logging.getLogger(__name__)


def user_id_of(username: str) -> int | None:
    """The id in an ``alias#id`` username (AI Horde's form), or None if it has none."""
    _, _, ident = username.rpartition("#")
    return int(ident) if ident.isascii() and ident.isdigit() else None


@dataclass(frozen=True)
class PriorityWorker:
    name: str
    models: frozenset[str]
    user_ids: frozenset[int]


def workers_for(table: Iterable[PriorityWorker], user_id: int, models: Sequence[str]) -> list[str]:
    """The workers that serve ``user_id`` first and can serve one of ``models`` (pure)."""
    wanted = set(models)
    return [w.name for w in table if user_id in w.user_ids and (not wanted or w.models & wanted)]


class PriorityRoutes:
    """The owners' priority lists of the workers that may receive jobs, refreshed in the background."""

    def __init__(self, engine: AsyncEngine, *, ttl: float = 5.0) -> None:
        self._engine = engine
        self._ttl = ttl
        self._table: tuple[PriorityWorker, ...] = ()
        self._loaded_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    def workers_for(self, user_id: int, models: Sequence[str]) -> list[str]:
        """Never waits: answers from the last table read and starts a refresh when it is stale."""
        if time.monotonic() - self._loaded_at > self._ttl and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return workers_for(self._table, user_id, models)

    async def refresh(self) -> None:
        """Read the lists now (start-up, and tests that change a list)."""
        await self._refresh()

    async def _refresh(self) -> None:
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(
                    sa.select(workers.c.name, workers.c.models, workers.c.priority_usernames).where(
                        workers.c.priority_usernames.is_not(None), workers.c.amqp_user != HTTP_WORKER_AMQP_USER,
                        workers.c.suspended_at.is_(None), workers.c.paused.is_(False),
                        workers.c.maintenance.is_(False)))).all()
        except SQLAlchemyError as exc:
            log.warning("owners' priority lists not refreshed: %s", exc)
        else:
            self._table = tuple(
                PriorityWorker(r.name, frozenset(r.models or ()),
                               frozenset(i for u in r.priority_usernames or () if (i := user_id_of(u)) is not None))
                for r in rows if r.priority_usernames)
            self._loaded_at = time.monotonic()
        finally:
            self._refreshing = None
