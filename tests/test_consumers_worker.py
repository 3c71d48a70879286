"""The worker against a real RabbitMQ, for what needs no dispatcher nor claims service (the test
plays them where needed).

These tests use a vhost of their own: the dispatcher and claims service running for other tests in
the session's vhost would otherwise answer this worker's asks and claims.
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

from api.provisioning import worker_queue_topology
from broker.amqp import connect, declare
from broker.messages import (
    ClaimRequest,
    ImageParams,
    JobAsk,
    JobMessage,
    JobOffer,
    ModelOffer,
    WorkerHeartbeat,
    decode,
)
from broker.topology import (
    ASKS_QUEUE,
    CLAIMS_QUEUE,
    DEAD_QUEUE,
    HEARTBEATS_QUEUE,
    JOBS_EXCHANGE,
    build_topology,
    worker_queue,
    worker_routing_key,
)
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
                policy: Policy | None = None, heartbeat_seconds: float = 5.0,
                ask_refresh_seconds: float = 10.0) -> Worker:
    cache = ModelCache({model: models_dir / "tiny-sd"}, device="cpu", progress=False, policy=policy)
    return Worker(amqp_url=url, name=f"w-{model}", cache=cache, claim_timeout=claim_timeout,
                  heartbeat_seconds=heartbeat_seconds, ask_refresh_seconds=ask_refresh_seconds)


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


async def next_ask(channel: AbstractChannel, worker: str) -> AbstractIncomingMessage:
    """The next ask of ``worker`` (the module's vhost keeps the other tests' unanswered asks)."""
    while (message := await next_message(channel, ASKS_QUEUE)).routing_key != f"ask.{worker}":
        pass
    return message


async def publish_job(channel: AbstractChannel, routing_key: str, body: bytes, *, type_: str,
                      message_id: str) -> None:
    exchange = await channel.get_exchange(JOBS_EXCHANGE)
    await exchange.publish(aio_pika.Message(body, type=type_, message_id=message_id), routing_key=routing_key)


async def test_malformed_jobs_in_its_own_queue_are_dead_lettered(channel: AbstractChannel, vhost_url: str,
                                                                 models_dir: Path) -> None:
    """The worker's own queue is the one it consumes (the models' queues are the dispatcher's)."""
    await declare(channel, worker_queue_topology("w-m-poison"))
    worker = make_worker(vhost_url, "m-poison", models_dir)
    await worker.start()
    try:
        own = worker_routing_key("w-m-poison")
        await publish_job(channel, own, b"{not json", type_="job.v1", message_id="bad-json")
        await publish_job(channel, own, make_job("m-poison").encode(), type_="claim.v1", message_id="bad-type")
        dead = [await next_message(channel, DEAD_QUEUE) for _ in range(2)]
    finally:
        await worker.stop()
    assert sorted(m.message_id or "" for m in dead) == ["bad-json", "bad-type"]
    for message in dead:
        death: Any = message.headers["x-death"][0]  # type: ignore[index,call-overload]
        assert death["reason"] == "rejected" and death["queue"] == worker_queue("w-m-poison")


async def test_asks_by_direct_reply_to_and_repeats_the_ask_while_waiting(channel: AbstractChannel, vhost_url: str,
                                                                         models_dir: Path) -> None:
    worker = make_worker(vhost_url, "m-claim", models_dir, policy=Policy(max_pixels=512 * 512, nsfw=True),
                         ask_refresh_seconds=0.5)
    await worker.start()
    try:
        first = await next_ask(channel, "w-m-claim")
        again = await next_ask(channel, "w-m-claim")  # unanswered: asked again, the same ask
    finally:
        await worker.stop()
    ask = decode(JobAsk, first.body, first.type)
    assert ask.worker == "w-m-claim"
    assert ask.capabilities.models == [ModelOffer(name="m-claim", kind="image")]
    assert ask.capabilities.max_pixels == 512 * 512 and ask.capabilities.nsfw is True
    assert first.routing_key == "ask.w-m-claim" and first.user_id == "guest"
    assert (first.reply_to or "").startswith("amq.rabbitmq.reply-to.")  # the broker's per-channel address
    assert first.correlation_id and first.correlation_id == again.correlation_id
    assert first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert decode(JobAsk, again.body, again.type) == ask


async def test_a_missing_queue_stops_the_start_with_a_clear_error(vhost_url: str, models_dir: Path) -> None:
    worker = make_worker(vhost_url, "m-nowhere", models_dir)
    with pytest.raises(WorkerStartError, match=r"horde\.jobs\.m-nowhere' does not exist"):
        await worker.start()


async def test_an_offered_job_that_does_not_fit_is_given_back_unstarted(channel: AbstractChannel, vhost_url: str,
                                                                        models_dir: Path) -> None:
    """Its limits travel in the ask, so the dispatcher offers nothing too large; should an offer not
    fit anyway (here, a dispatcher played by the test), the worker gives it back, lease and all."""
    worker = make_worker(vhost_url, "m-picky", models_dir, policy=Policy(max_pixels=64 * 64), claim_timeout=0.5)
    job = make_job("m-picky", size=128)
    await worker.start()
    try:
        asked = await next_ask(channel, "w-m-picky")
        assert decode(JobAsk, asked.body, asked.type).capabilities.max_pixels == 64 * 64
        offer = JobOffer(granted=True, job=job, model="m-picky", lease_id="lease-1")
        await channel.default_exchange.publish(
            aio_pika.Message(offer.encode(), type=offer.schema_name, correlation_id=asked.correlation_id),
            routing_key=asked.reply_to or "")
        given = decode(ClaimRequest, (await next_message(channel, CLAIMS_QUEUE)).body, None)
    finally:
        await worker.stop()
    assert given == ClaimRequest(job_id=job.job_id, worker="w-m-picky", model="m-picky", decline=True,
                                 lease_id="lease-1")
    assert worker.stats.jobs_done == 0 and worker.stats.jobs_faulted == 0


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
