"""Which waiting worker gets which held job: the dispatcher's rule, pure.

The best job goes first (highest tier, then the oldest), to the worker that has waited longest
among those it fits (``broker.fit``). Each worker gets one job per round (up to its ask's ``amount``:
the best jobs it fits, while it has waited longest); a job no waiting worker
fits stays held for the next ask. ``at_the_door``: the same rule for jobs being accepted, which a
waiting worker may be handed without their passing through a queue.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.fit import first_fit
from broker.messages import Capabilities, JobMessage


@dataclass(eq=False)
class Ask:
    """A worker waiting for a job; ``since`` orders the waiters (monotonic seconds)."""

    worker: str
    capabilities: Capabilities
    since: float
    refreshed: float
    reply_to: str
    correlation_id: str
    record: Any = None  # the worker's registration (api.accounts.WorkerRecord)
    trusted: bool = False  # its owner has the trusted role: it may take trusted_workers jobs
    amount: int = 1  # jobs it asked for at once (``JobAsk.amount``)


@dataclass(eq=False)
class Held:
    """A job delivered from ``model``'s queue and not yet handed out; ``seq`` is arrival order."""

    model: str
    job: JobMessage
    seq: int
    delivery: Any = field(default=None, repr=False)  # the AMQP delivery, acked once the job is leased


def fit(held: Held, ask: Ask) -> bool:
    """Whether ``ask``'s worker can and may take ``held``."""
    return ((ask.trusted or not held.job.trusted_workers)
            and first_fit(held.job, held.model, ask.capabilities) is not None)


def best_first(held: Iterable[Held]) -> list[Held]:
    return sorted(held, key=lambda h: (-h.job.tier, h.job.created_at, h.seq))


def plan(asks: Sequence[Ask], held: Iterable[Held]) -> list[tuple[Ask, Held]]:
    """Pairs (worker, job) to lease now; ``asks`` in waiting order."""
    by_model: dict[str, list[Ask]] = {}
    for ask in sorted(asks, key=lambda a: a.since):
        for offer in ask.capabilities.models:
            by_model.setdefault(offer.name, []).append(ask)
    given: Counter[str] = Counter()
    leased: set[str] = set()  # a job queued for several models has a copy in each queue: one lease a round
    pairs: list[tuple[Ask, Held]] = []
    for job in best_first(held):
        if job.job.job_id in leased:
            continue
        for ask in by_model.get(job.model, ()):
            if given[ask.worker] < ask.amount and fit(job, ask):
                pairs.append((ask, job))
                given[ask.worker] += 1
                leased.add(job.job.job_id)
                break
    return pairs


def at_the_door(asks: Sequence[Ask], held: Iterable[Held], arriving: Iterable[Held],
                drained: Callable[[str], bool]) -> list[tuple[Ask, Held]]:
    """The pairs (worker, arriving job) to lease as the jobs are accepted.

    An arriving job may be handed over only for a model whose queue is ``drained`` (everything it
    held has reached the dispatcher), and only where ``plan`` over what is held *and* what arrives
    gives it to a waiting worker: a job already held that fits goes first, by the same rule as a
    round, so nothing passes by a better or older job.
    """
    arriving = [h for h in arriving if drained(h.model)]
    if not arriving or not asks:
        return []
    door = {id(h) for h in arriving}
    return [(ask, job) for ask, job in plan(asks, [*held, *arriving]) if id(job) in door]
