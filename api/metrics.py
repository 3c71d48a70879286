"""``GET /metrics``: the horde's health in Prometheus' text exposition format (version 0.0.4).

What each figure is, and where it comes from (``horde api`` may run several uvicorn processes, and
a scrape reaches any one of them):

- ``horde_queue_messages`` / ``horde_queue_consumers`` per model: the broker's counts (passive
  declares) as of the answering process's last reconciler tick: the same whichever process answers.
- ``horde_jobs`` per state: counted in the database, process-independent.
- ``horde_workers_online`` per kind: workers seen in the last five minutes (database).
- ``horde_settlement_lag_seconds``: job finished -> its ledger entry written, over the latest
  settled jobs (database, process-independent); ``horde_settlement_pending_jobs`` counts the
  priced jobs among them the ledger has not settled yet.
- ``horde_dispatch_seconds``: a histogram of job published -> claim granted, observed by the
  claims service of the answering process only; its ``pid`` label says which process that is, so
  a scraper sums the series of every pid (each process consumes a share of the claims).
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from api.jobs import CANCELLED, CLAIMED, DONE, FAULTED, QUEUED
from api.tables import jobs
from config.database import as_utc, utcnow
from ledger.tables import entries

router = APIRouter(tags=["metrics"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_STATES = (QUEUED, CLAIMED, DONE, FAULTED, CANCELLED)
#: How many of the latest done jobs the settlement lag is measured over.
SETTLEMENT_SAMPLE = 1000
LAG_QUANTILES = (0.5, 0.9, 0.99, 1.0)


class Histogram:
    """A cumulative histogram of seconds in this process (thread-safe; observations are cheap)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one: above every bucket (+Inf only)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._sum += seconds

    @property
    def count(self) -> int:
        return sum(self._counts)

    def lines(self, labels: dict[str, str]) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
            cumulative += n
            out.append(_sample(f"{self.name}_bucket", {**labels, "le": _number(bound)}, cumulative))
        out.append(_sample(f"{self.name}_sum", labels, total))
        out.append(_sample(f"{self.name}_count", labels, cumulative))
        return out


#: Observed by the claims service (api.claims) at each grant.
DISPATCH_SECONDS = Histogram(
    "horde_dispatch_seconds",
    "Job published (or last republished) to claim granted, in seconds, seen by this API process (label pid).",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


def observe_dispatch(published_at: datetime | None, granted_at: datetime) -> None:
    """Record a grant; jobs stored before ``published_at`` existed are skipped."""
    published = as_utc(published_at)
    if published is not None:
        DISPATCH_SECONDS.observe((granted_at - published).total_seconds())


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
async def metrics(request: Request) -> PlainTextResponse:
    horde = request.app.state.horde
    async with horde.engine.connect() as conn:
        body = await exposition(conn, horde.reconciler.queue_stats)
    return PlainTextResponse(body, media_type=CONTENT_TYPE)


async def exposition(conn: AsyncConnection, queue_stats: dict) -> str:  # type: ignore[type-arg]
    """Every metric as one text document."""
    lines: list[str] = []
    lines += _family("horde_queue_messages", "gauge", "Messages ready in the model's job queue (broker).",
                     (({"model": m}, s.ready) for m, s in sorted(queue_stats.items())))
    lines += _family("horde_queue_consumers", "gauge", "Workers consuming the model's job queue (broker).",
                     (({"model": m}, s.consumers) for m, s in sorted(queue_stats.items())))
    states = await _jobs_by_state(conn)
    lines += _family("horde_jobs", "gauge", "Jobs in the database by state.",
                     (({"state": s}, states.get(s, 0)) for s in sorted(set(JOB_STATES) | set(states))))
    online = await _workers_online(conn)
    lines += _family("horde_workers_online", "gauge", "Workers seen in the last five minutes, by kind.",
                     (({"kind": k}, online.get(k, 0)) for k in sorted({"image", "text"} | set(online))))
    lags, pending = await _settlement(conn)
    lines += _family("horde_settlement_lag_seconds", "gauge",
                     f"Job finished to settled by the ledger, in seconds, quantile over the latest "
                     f"{SETTLEMENT_SAMPLE} done jobs (database).",
                     (({"quantile": _number(q)}, _quantile(lags, q)) for q in LAG_QUANTILES))
    lines += _family("horde_settlement_sampled_jobs", "gauge",
                     "Settled jobs the settlement lag quantiles were computed over.", [({}, len(lags))])
    lines += _family("horde_settlement_pending_jobs", "gauge",
                     f"Priced jobs among the latest {SETTLEMENT_SAMPLE} done ones not settled yet.", [({}, pending)])
    lines += DISPATCH_SECONDS.lines({"pid": str(os.getpid())})
    return "\n".join(lines) + "\n"


async def _jobs_by_state(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))
    return {state: int(n) for state, n in rows}


async def _workers_online(conn: AsyncConnection) -> dict[str, int]:
    from api.workers import online_presences  # imported here: api.workers imports the app's dependencies

    counts: dict[str, int] = {}
    for presence in await online_presences(conn, utcnow()):
        kind = presence.row.kind or "image"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


async def _settlement(conn: AsyncConnection) -> tuple[list[float], int]:
    """Lags (seconds, sorted) of the settled jobs among the latest done ones, and how many priced
    ones are not settled yet. Uses the (state, created_at) index and the unique entry key."""
    latest = (sa.select(jobs.c.id, jobs.c.finished_at, jobs.c.price)
              .where(jobs.c.state == DONE).order_by(jobs.c.created_at.desc()).limit(SETTLEMENT_SAMPLE)
              .subquery())
    debit_key = sa.literal("job:") + latest.c.id + sa.literal(":debit")
    rows = await conn.execute(
        sa.select(latest.c.finished_at, latest.c.price, entries.c.created_at)
        .select_from(latest.outerjoin(entries, entries.c.key == debit_key))
    )
    lags: list[float] = []
    pending = 0
    for finished_at, price, settled_at in rows:
        if settled_at is not None and finished_at is not None:
            lags.append(max(0.0, (as_utc(settled_at) - as_utc(finished_at)).total_seconds()))
        elif settled_at is None and price:
            pending += 1
    return sorted(lags), pending


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values; NaN (Prometheus' "no value") if there are none."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))]


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
            *(_sample(name, labels, value) for labels, value in samples)]


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {_number(value)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))
