"""Uptime rewards, as pure functions: a worker that stays online earns its owner kudos.

A worker's heartbeats (every few seconds) build a *streak* of continuous uptime. Each full
``INTERVAL_SECONDS`` (10 minutes) of a streak is paid once: the payment's ledger key names the
worker, the streak's start and the interval's number, so duplicated or replayed heartbeats, and
several API processes handling them, can never pay an interval twice. A worker silent for longer
than ``STALE_SECONDS`` starts a new streak (its clock restarts) at its next heartbeat.

Amounts follow the public AI Horde: an image worker earns 50 + 2 per model it serves; a text
worker 25 scaled by model size (``max(billions / 7, 0.25)``), per interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

INTERVAL_SECONDS = 600.0
STALE_SECONDS = 300.0


@dataclass(frozen=True)
class Streak:
    start: datetime
    last_seen: datetime
    paid_intervals: int = 0


def observe(streak: Streak | None, at: datetime, *, stale_after: float = STALE_SECONDS) -> Streak:
    """The streak after a heartbeat at ``at``: extended, or restarted after silence (or none)."""
    if streak is None or (at - streak.last_seen).total_seconds() > stale_after:
        return Streak(start=at, last_seen=at)
    return Streak(streak.start, max(streak.last_seen, at), streak.paid_intervals)


def due_intervals(streak: Streak, *, interval: float = INTERVAL_SECONDS) -> range:
    """The numbers (1, 2, …) of completed intervals of ``streak`` not paid yet."""
    completed = int((streak.last_seen - streak.start) / timedelta(seconds=interval))
    return range(streak.paid_intervals + 1, completed + 1)


def uptime_kudos(*, kind: str, models: int, parameters_b: float = 0.0) -> float:
    """What one interval of uptime earns a worker's owner."""
    if kind == "text":
        return round(25 * max(parameters_b / 7, 0.25), 2)
    return float(50 + 2 * max(0, models))
