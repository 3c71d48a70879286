"""The whole RabbitMQ topology, declared in one place and idempotently.

Trusted services (API, ledger) declare it on start; workers never declare anything (their
``configure`` permission is empty) and only look queues up passively.

    horde.jobs (direct)      --model-->          horde.jobs.<model>   (priority 0..4, DLX; read by the dispatcher only)
                             --worker.<name>-->   horde.jobs.worker.<name> (a worker's own queue)
    horde.events (topic)     --ask.*-->           horde.asks           (a worker asks for its next job; RPC)
                             --claim.*-->         horde.claims         (RPC, short TTL)
                             --job.completed.*--> horde.results        (DLX)
                             --job.faulted.*-->   horde.results
                             --job.done-->        horde.ledger         (DLX)
                             --kudos.uptime-->    horde.ledger
                             --worker.heartbeat.*--> horde.heartbeats  (bounded, short TTL)
    horde.dlx (fanout)       -->                  horde.dead           (poison and rejected messages)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

JOBS_EXCHANGE = "horde.jobs"
EVENTS_EXCHANGE = "horde.events"
DEAD_LETTER_EXCHANGE = "horde.dlx"

ASKS_QUEUE = "horde.asks"
CLAIMS_QUEUE = "horde.claims"
RESULTS_QUEUE = "horde.results"
LEDGER_QUEUE = "horde.ledger"
HEARTBEATS_QUEUE = "horde.heartbeats"
DEAD_QUEUE = "horde.dead"

#: Priority tiers 0..4 (see ledger.tiers); classic queues need x-max-priority = highest tier.
MAX_PRIORITY = 4

#: Worker names end every routing key a worker may publish, so topic permissions can pin them.
WORKER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")

JOB_DONE_KEY = "job.done"
UPTIME_KEY = "kudos.uptime"


_UNSAFE_IN_QUEUE_NAME = re.compile(r"[^a-zA-Z0-9._:-]")


def job_queue(model: str) -> str:
    """The queue of a model. Model names may hold characters AMQP clients refuse in queue names
    (``AlbedoBase XL (SDXL)``): those become ``_``, with a short hash keeping names distinct."""
    safe = _UNSAFE_IN_QUEUE_NAME.sub("_", model)
    if safe != model:
        safe += "-" + hashlib.sha1(model.encode()).hexdigest()[:8]
    return f"{JOBS_EXCHANGE}.{safe}"


def worker_queue(worker: str) -> str:
    """A worker's own priority queue: jobs of the users its owner serves first on it (issue 5).
    Declared by the horde (never by the worker), read by that worker only."""
    return f"{JOBS_EXCHANGE}.worker.{worker}"


def worker_routing_key(worker: str) -> str:
    """The ``horde.jobs`` routing key bound to a worker's own queue (model names never start so)."""
    return f"worker.{worker}"


def ask_key(worker: str) -> str:
    return f"ask.{worker}"


def claim_key(worker: str) -> str:
    return f"claim.{worker}"


def completed_key(worker: str) -> str:
    return f"job.completed.{worker}"


def faulted_key(worker: str) -> str:
    return f"job.faulted.{worker}"


def heartbeat_key(worker: str) -> str:
    return f"worker.heartbeat.{worker}"


def worker_of(routing_key: str) -> str:
    """The worker name a worker-published routing key ends with."""
    return routing_key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[tuple[str, str], ...]  # (name, type)
    queues: tuple[QueueSpec, ...]


def build_topology(models: list[str]) -> Topology:
    """The exchanges, queues and bindings for a horde serving ``models``; pure data."""
    dlx = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    job_queues = tuple(
        QueueSpec(job_queue(m), {"x-max-priority": MAX_PRIORITY, **dlx}, ((JOBS_EXCHANGE, m),))
        for m in models
    )
    return Topology(
        exchanges=(
            (JOBS_EXCHANGE, "direct"),
            (EVENTS_EXCHANGE, "topic"),
            (DEAD_LETTER_EXCHANGE, "fanout"),
        ),
        queues=job_queues
        + (
            QueueSpec(ASKS_QUEUE, {"x-message-ttl": 30_000, **dlx}, ((EVENTS_EXCHANGE, "ask.*"),)),
            QueueSpec(CLAIMS_QUEUE, {"x-message-ttl": 30_000, **dlx}, ((EVENTS_EXCHANGE, "claim.*"),)),
            QueueSpec(
                RESULTS_QUEUE,
                dlx,
                ((EVENTS_EXCHANGE, "job.completed.*"), (EVENTS_EXCHANGE, "job.faulted.*")),
            ),
            QueueSpec(LEDGER_QUEUE, dlx, ((EVENTS_EXCHANGE, JOB_DONE_KEY), (EVENTS_EXCHANGE, UPTIME_KEY))),
            QueueSpec(
                HEARTBEATS_QUEUE,
                {"x-message-ttl": 60_000, "x-max-length": 10_000},
                ((EVENTS_EXCHANGE, "worker.heartbeat.*"),),
            ),
            QueueSpec(DEAD_QUEUE, {}, ((DEAD_LETTER_EXCHANGE, ""),)),
        ),
    )
