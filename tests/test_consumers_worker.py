"""The worker against a real RabbitMQ, for what needs no claims service.

These tests use a vhost of their own: a claims service running for other tests in the session's
vhost would otherwise answer this worker's claims.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker.amqp import connect, declare
from broker.messages import ClaimRequest, ImageParams, JobMessage, TextParams, WorkerHeartbeat, decode
from broker.topology import CLAIMS_QUEUE, DEAD_QUEUE, HEARTBEATS_QUEUE, JOBS_EXCHANGE, build_topology, job_queue
from consumers.cache import ModelCache, Policy
from consumers.errors import WorkerStartError
from consumers.worker import Worker
from tests import services

MODELS = ("m-poison", "m-claim", "m-picky", "m-beat")


@pytest.fixture(scope="module")
def vhost_url() -> Iterator[str]:
    url = services.create_vhost("horde-test-worker")
    yield url
    services.delete_vhost(url)


@pytest.fixture
async def channel(vhost_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await connect(vhost_url, name="test-consumers-worker")
    channel = await connection.channel()
    await declare(channel, build_topology(list(MODELS)))
    yield channel
    await connection.close()


def make_worker(url: str, model: str, models_dir: Path, *, claim_timeout: float = 5.0,
                policy: Policy | None = None, heartbeat_seconds: float = 5.0) -> Worker:
    cache = ModelCache({model: models_dir / "tiny-sd"}, device="cpu", progress=False, policy=policy)
    return Worker(amqp_url=url, name=f"w-{model}", cache=cache, claim_timeout=claim_timeout,
                  heartbeat_seconds=heartbeat_seconds)


def make_job(model: str, size: int = 64) -> JobMessage:
    params = ImageParams(width=size, height=size, steps=2, cfg_scale=7.0, sampler_name="k_euler", karras=False)
    return JobMessage(job_id=uuid.uuid4().hex, request_id="req", kind="image", models=[model], prompt="a cat",
                      params=params, tier=0, created_at=datetime.now(UTC))


async def next_message(channel: AbstractChannel, queue: str, *, timeout: float = 10.0) -> AbstractIncomingMessage:
    source = await channel.get_queue(queue)
    deadline = asyncio.get_running_loop().time() + timeout
    while (message := await source.get(no_ack=True, fail=False)) is None:
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived in {queue}"
        await asyncio.sleep(0.05)
    return message


async def publish_job(channel: AbstractChannel, model: str, body: bytes, *, type_: str, message_id: str) -> None:
    exchange = await channel.get_exchange(JOBS_EXCHANGE)
    await exchange.publish(aio_pika.Message(body, type=type_, message_id=message_id), routing_key=model)


async def test_malformed_jobs_are_dead_lettered(channel: AbstractChannel, vhost_url: str, models_dir: Path) -> None:
    worker = make_worker(vhost_url, "m-poison", models_dir)
    await worker.start()
    try:
        await publish_job(channel, "m-poison", b"{not json", type_="job.v1", message_id="bad-json")
        await publish_job(channel, "m-poison", make_job("m-poison").encode(), type_="claim.v1", message_id="bad-type")
        text = JobMessage(job_id="t", request_id="r", kind="text", models=["m-poison"], prompt="hi",
                          params=TextParams(), tier=0, created_at=datetime.now(UTC))
        await publish_job(channel, "m-poison", text.encode(), type_="job.v1", message_id="wrong-kind")
        dead = [await next_message(channel, DEAD_QUEUE) for _ in range(3)]
    finally:
        await worker.stop()
    assert sorted(m.message_id or "" for m in dead) == ["bad-json", "bad-type", "wrong-kind"]
    for message in dead:
        death: Any = message.headers["x-death"][0]  # type: ignore[index,call-overload]
        assert death["reason"] == "rejected" and death["queue"] == job_queue("m-poison")


async def test_claims_by_direct_reply_to_and_gives_unclaimed_jobs_back(channel: AbstractChannel, vhost_url: str,
                                                                      models_dir: Path) -> None:
    worker = make_worker(vhost_url, "m-claim", models_dir, claim_timeout=0.5)
    job = make_job("m-claim")
    await worker.start()
    try:
        await publish_job(channel, "m-claim", job.encode(), type_=JobMessage.schema_name, message_id=job.job_id)
        first = await next_message(channel, CLAIMS_QUEUE)
        again = await next_message(channel, CLAIMS_QUEUE)  # unanswered: held, and claimed again
    finally:
        await worker.stop()
    request = decode(ClaimRequest, first.body, first.type)
    assert request == ClaimRequest(job_id=job.job_id, worker="w-m-claim", model="m-claim")
    assert first.routing_key == "claim.w-m-claim" and first.user_id == "guest"
    assert (first.reply_to or "").startswith("amq.rabbitmq.reply-to.")  # the broker's per-channel address
    assert first.correlation_id and first.correlation_id != again.correlation_id
    assert first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    # The job was never claimed and never acked: back in its queue when the worker stopped, not lost.
    assert decode(JobMessage, (await next_message(channel, job_queue("m-claim"))).body, None) == job


async def test_a_missing_queue_stops_the_start_with_a_clear_error(vhost_url: str, models_dir: Path) -> None:
    worker = make_worker(vhost_url, "m-nowhere", models_dir)
    with pytest.raises(WorkerStartError, match=r"horde\.jobs\.m-nowhere' does not exist"):
        await worker.start()


async def test_a_job_the_worker_cannot_do_is_never_claimed(channel: AbstractChannel, vhost_url: str,
                                                           models_dir: Path) -> None:
    """Too large for this worker's max_pixels: handed back unclaimed, for a worker that can."""
    worker = make_worker(vhost_url, "m-picky", models_dir, policy=Policy(max_pixels=64 * 64))
    job = make_job("m-picky", size=128)
    await worker.start()
    try:
        await publish_job(channel, "m-picky", job.encode(), type_=JobMessage.schema_name, message_id=job.job_id)
        await asyncio.sleep(2.5)  # received, refused, declined after a pause (unanswered here)
    finally:
        await worker.stop()
    claims = await channel.get_queue(CLAIMS_QUEUE)
    requests = []
    while (request := await claims.get(no_ack=True, fail=False)) is not None:
        requests.append(decode(ClaimRequest, request.body, request.type))
    # Declined (the claims service would put it back in the queue), never claimed; unanswered
    # here, so the worker held it and the broker requeued it when the worker disconnected.
    assert requests and all(r.decline for r in requests)
    assert decode(JobMessage, (await next_message(channel, job_queue("m-picky"))).body, None) == job


async def test_heartbeats_report_the_worker_every_few_seconds(channel: AbstractChannel, vhost_url: str,
                                                              models_dir: Path) -> None:
    await (await channel.get_queue(HEARTBEATS_QUEUE)).purge()  # earlier tests' workers beat too
    worker = make_worker(vhost_url, "m-beat", models_dir, heartbeat_seconds=0.2)
    await worker.start()
    try:
        beats = [await next_message(channel, HEARTBEATS_QUEUE) for _ in range(3)]
    finally:
        await worker.stop()
    first = beats[0]
    assert first.routing_key == "worker.heartbeat.w-m-beat" and first.user_id == "guest"
    assert first.type == "worker-heartbeat.v1"
    assert first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    beat = decode(WorkerHeartbeat, first.body, first.type)
    assert beat.worker == "w-m-beat" and beat.models == ["m-beat"] and beat.loaded_models == ["m-beat"]
    assert beat.state == "idle" and beat.jobs_done == 0 and beat.device == "cpu" and beat.nsfw
    times = [decode(WorkerHeartbeat, b.body, b.type).sent_at for b in beats]
    assert times == sorted(times) and (times[-1] - times[0]).total_seconds() < 3
