"""Queue priority from kudos: a pure function of the requester's balance at submit time.

Tiers map onto RabbitMQ message priorities 0..4 (classic queues with x-max-priority = 4), so
under congestion those who gave to the horde are served first. Boundaries are decades of
kudos; the anonymous account and anyone at or below zero share the lowest tier.

| tier | balance (kudos)          |
|------|--------------------------|
| 0    | anonymous, or <= 0       |
| 1    | 0 < balance < 1,000      |
| 2    | 1,000 <= balance < 10,000|
| 3    | 10,000 <= b < 100,000    |
| 4    | >= 100,000               |

Aging keeps anyone from starving: a job that has waited ``step`` seconds gains a tier, and keeps
gaining one per ``step`` until the highest (``aged_tier``). The reconciler republishes it at its
new priority.
"""

from __future__ import annotations

LOWEST_TIER = 0
HIGHEST_TIER = 4
_BOUNDARIES = (1_000.0, 10_000.0, 100_000.0)  # lower bounds of tiers 2, 3, 4


def priority_tier(balance: float, *, anonymous: bool = False) -> int:
    """The queue priority tier (0..4) for a requester with ``balance`` kudos."""
    if anonymous or balance <= 0:
        return LOWEST_TIER
    return 1 + sum(1 for bound in _BOUNDARIES if balance >= bound)


def aged_tier(tier: int, *, waited_seconds: float, step_seconds: float) -> int:
    """The tier of a job of ``tier`` that has waited ``waited_seconds``: one more per ``step_seconds``."""
    if step_seconds <= 0 or waited_seconds <= 0:
        return tier
    return min(HIGHEST_TIER, tier + int(waited_seconds // step_seconds))
