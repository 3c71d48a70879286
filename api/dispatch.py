"""Publishing a job to the queues of every model that may serve it, at its priority tier."""

from __future__ import annotations

import asyncio

from broker.amqp import Publisher
from broker.messages import JobMessage
from broker.topology import JOBS_EXCHANGE


async def publish_job(publisher: Publisher, message: JobMessage) -> None:
    """Confirmed, persistent, mandatory publish of one copy per model; claims make copies harmless."""
    await asyncio.gather(*(
        publisher.publish(JOBS_EXCHANGE, model, message, message_id=message.job_id, priority=message.tier)
        for model in message.models
    ))
