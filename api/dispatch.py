"""Publishing a job to the queues of every model that may serve it, at its priority tier."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from broker.amqp import Publisher
from broker.errors import BrokerError
from broker.messages import JobMessage
from broker.topology import JOBS_EXCHANGE, worker_routing_key

log = logging.getLogger(__name__)


async def publish_job(publisher: Publisher, message: JobMessage, *, only: Sequence[str] | None = None) -> None:
    """Confirmed, persistent, mandatory publish of one copy per model (or per model of ``only``: a
    job a worker declined goes back to that one queue); claims make copies harmless."""
    await asyncio.gather(*(
        publisher.publish(JOBS_EXCHANGE, model, message, message_id=message.job_id, priority=message.tier)
        for model in (message.models if only is None else only)
    ))


async def publish_priority_copies(publisher: Publisher, message: JobMessage, workers: Sequence[str]) -> None:
    """One more copy in the own queue of each worker whose owner serves this requester first.

    Best effort: the copies in the models' queues already guarantee the job; a worker whose own
    queue is missing (or a broker hiccup) only loses the head start, so it is logged, not raised.
    """
    outcomes = await asyncio.gather(*(
        publisher.publish(JOBS_EXCHANGE, worker_routing_key(worker), message, message_id=message.job_id,
                          priority=message.tier)
        for worker in workers
    ), return_exceptions=True)
    for worker, outcome in zip(workers, outcomes):
        if isinstance(outcome, BrokerError):
            log.warning("job %s: no priority copy for worker %s: %s", message.job_id, worker, outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
