#!/usr/bin/env python
"""Dispatch latency: from submitting a job over HTTP to an idle worker receiving it.

Each run: a fresh database and vhost, ``horde api`` on a free port, and one idle registered
worker in a separate process that asks the API's dispatcher for jobs as a real worker does (the
horde's own ``consumers.claims.ClaimClient.next_offer``: an ask on ``ask.<worker>`` with direct
reply-to). Workers read no model queue: the job goes from the model's queue to the dispatcher,
which leases it to the waiting worker and replies with a ``JobOffer``. "Received" is the offer,
lease included, handed to the worker by ``next_offer``: no claim round trip follows. Jobs are
submitted one at a time over one keep-alive HTTP connection (stdlib http.client), with a gap
between them so the worker is idle (asking) when each arrives. Timestamps come from
CLOCK_MONOTONIC, which is one clock for every process on the host:

- ``submit→delivery``: from just before the POST is written to the offer reaching the worker;
- ``202→delivery``: from the 202 being read to the offer (negative: offered before the answer);
- ``POST→202``: the HTTP round trip itself.

The worker asks again at once, and meanwhile publishes the job's completion (a tiny WebP, its
lease) so that it never holds more than a lease or two: at its cap of leases
(HORDE_MAX_LEASES_PER_WORKER) the dispatcher would answer "not now" and the next job would wait
for a retry, which the run reports as a problem. An ask waiting longer than the dispatcher's
PROBE_AFTER_SECONDS (1 s) is probed before the grant (is its reply-to still consumed?), so gaps
near 1 s measure that round trip too. HORDE_REPUBLISH_AFTER_SECONDS is a day, as in the other
benchmarks, so that the reconciler adds no copies; nothing else differs from the defaults.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from http.client import HTTPConnection

try:
    from bench import _common as c
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]

WORKER = "bench-idle-worker"
BODY = '{"prompt":"a cat","models":["tiny-sd"],"params":{"width":64,"height":64,"steps":4}}'
MODEL = "tiny-sd"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Dispatch latency from POST /api/v2/generate/async to an idle worker's job offer.",
        epilog="example: python bench/dispatch.py --jobs 500 --runs 3 --json /tmp/dispatch.json",
    )
    p.add_argument("--jobs", type=int, default=500, help="measured jobs per run (default 500)")
    p.add_argument("--warmup", type=int, default=20, help="jobs submitted first and not measured (default 20)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between jobs, in ms (default 20)")
    p.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    p.add_argument("--workers", type=int, default=1, help="HORDE_API_WORKERS (default 1)")
    p.add_argument("--apikey", default="0000000000", help="apikey header (default: the anonymous key)")
    c.add_noise_arguments(p)
    p.add_argument("--json", help="write all results as JSON to this file")
    args = p.parse_args(argv)
    args.max_attempts = args.max_attempts or 4 * args.runs
    if not 1 <= args.jobs <= 20_000 or not 0 <= args.warmup <= 1000 or not 1 <= args.runs <= 20:
        p.error("keep --jobs in 1..20000, --warmup in 0..1000 and --runs in 1..20")
    if not 0 <= args.gap_ms <= 1000:
        p.error("--gap-ms in 0..1000")
    return args


def consume(amqp_url: str, ready, stop, results, offered) -> None:  # type: ignore[no-untyped-def]
    """The idle worker, in its own process: ([(request id, CLOCK_MONOTONIC ns) per offer], how many
    asks were answered "not now") goes back through ``results``."""
    import asyncio

    results.put(asyncio.run(_ask_forever(amqp_url, ready, stop, offered)))


async def _ask_forever(amqp_url: str, ready, stop, offered) -> tuple[list[tuple[str, int]], int]:  # type: ignore[no-untyped-def]
    """Ask for a job, record the offer, ask again; complete each job in the background.
    ``offered`` (a shared counter) tells the driver how many offers came."""
    import asyncio

    from broker.amqp import Publisher, amqp_user, connect
    from consumers.claims import ClaimClient
    from consumers.errors import OfferWithdrawn

    seen: list[tuple[str, int]] = []
    not_now = 0
    stopping = asyncio.Event()
    completions: set[asyncio.Task[None]] = set()
    image = c.tiny_webp()
    capabilities = c.image_capabilities([MODEL])
    connection = await connect(amqp_url, name="bench-idle-worker")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher = Publisher(channel, user_id=amqp_user(amqp_url))
        claims = ClaimClient(channel, publisher, worker=WORKER, timeout=30)
        await claims.start()

        async def watch_stop() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            stopping.set()

        watcher = asyncio.create_task(watch_stop())
        ready.set()
        while not stopping.is_set():
            try:
                offer = await claims.next_offer(capabilities, stopping)
            except OfferWithdrawn as exc:
                not_now += 1
                await asyncio.sleep(exc.retry_after)
                continue
            if offer is None:
                break
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            seen.append((offer.job.request_id, now))
            offered.value = len(seen)
            task = asyncio.create_task(_complete(publisher, offer, image))
            completions.add(task)
            task.add_done_callback(completions.discard)
        await asyncio.gather(*completions)
        await watcher
    finally:
        await connection.close()
    return seen, not_now


async def _complete(publisher, offer, image: bytes) -> None:  # type: ignore[no-untyped-def]
    """Publish the job's completion, as a worker that generates instantly: its lease ends."""
    import uuid

    from broker.messages import JobCompleted
    from broker.topology import EVENTS_EXCHANGE, completed_key

    completed = JobCompleted(job_id=offer.job.job_id, lease_id=offer.lease_id, worker=WORKER, model=offer.model,
                             seed=str(offer.job.params.seed or 0), image=image, width=64, height=64,
                             generation_seconds=0.0)
    await publisher.publish(EVENTS_EXCHANGE, completed_key(WORKER), completed, message_id=uuid.uuid4().hex)


def summarize(values_ns: list[int]) -> dict[str, float]:
    ms = [v / 1e6 for v in values_ns]
    return {"p50": round(c.percentile(ms, 50), 2), "p90": round(c.percentile(ms, 90), 2),
            "p99": round(c.percentile(ms, 99), 2), "max": round(max(ms), 2), "min": round(min(ms), 2),
            "mean": round(sum(ms) / len(ms), 2)}


def one_run(args: argparse.Namespace, label: str) -> dict:
    background = c.wait_quiet(args.max_background, args.wait_quiet)
    load_before = c.loadavg()
    stack = c.Stack.create()
    api = consumer = None
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    try:
        port = c.free_port()
        c.register_workers(stack.database_url, [WORKER], stack.rabbitmq_url)
        api = c.start_api(stack, port, workers=args.workers, republish_after_seconds=86400)
        ready, results, offered = ctx.Event(), ctx.Queue(), ctx.Value("i", 0, lock=False)
        consumer = ctx.Process(target=consume, args=(stack.rabbitmq_url, ready, stop, results, offered),
                               daemon=True)
        consumer.start()
        if not ready.wait(30):
            raise RuntimeError("the idle worker did not start")
        http = HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json", "apikey": args.apikey}
        sent: list[tuple[str, int, int]] = []  # (request id, before POST, after 202)
        statuses: dict[int, int] = {}
        clock = time.CLOCK_MONOTONIC
        time.sleep(0.5)
        window = c.CpuWindow({"api": api.pid, "consumer": consumer.pid}, singles={"bench": os.getpid()})
        for i in range(args.warmup + args.jobs):
            if i == args.warmup:
                window.start()
            time.sleep(args.gap_ms / 1000)
            t0 = time.clock_gettime_ns(clock)
            http.request("POST", "/api/v2/generate/async", body=BODY, headers=headers)
            response = http.getresponse()
            data = response.read()
            t1 = time.clock_gettime_ns(clock)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 202 and i >= args.warmup:
                sent.append((json.loads(data)["id"], t0, t1))
        cpu = window.stop()
        http.close()
        deadline = time.monotonic() + 10
        accepted = statuses.get(202, 0)  # warm-up included: every accepted job is offered, in order
        while offered.value < accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a duplicate offer would come now
        stop.set()
        seen, not_now = results.get(timeout=30)
        consumer.join(10)
        load_after = c.loadavg()
        first: dict[str, int] = {}
        for request_id, t in seen:
            first.setdefault(request_id, t)
        duplicates = len(seen) - len(first)
        to_delivery, after_202, rtt = [], [], []
        missing = 0
        for request_id, t0, t1 in sent:
            t = first.get(request_id)
            if t is None:
                missing += 1
                continue
            to_delivery.append(t - t0)
            after_202.append(t - t1)
            rtt.append(t1 - t0)
        problems = []
        if missing:
            problems.append(f"{missing} accepted jobs never reached the worker")
        if duplicates:
            problems.append(f"{duplicates} jobs offered twice")
        if not_now:  # the worker waited a retry: that job's latency is not the dispatch's
            problems.append(f"{not_now} asks answered 'not now' (the worker at its lease cap)")
        if any(s != 202 for s in statuses):
            problems.append(f"non-202 answers: {statuses}")
        run = {
            "label": label, "jobs": len(sent), "statuses": statuses,
            "submit_to_delivery_ms": summarize(to_delivery) if to_delivery else None,
            "after_202_to_delivery_ms": summarize(after_202) if after_202 else None,
            "post_to_202_ms": summarize(rtt) if rtt else None,
            "delivered_before_202": sum(1 for d in after_202 if d < 0),
            "cpu": cpu, "clean": cpu["other"] <= args.max_other, "background_busy_before": background,
            "loadavg_before": load_before, "loadavg_after": load_after, "problems": problems,
        }
        return run
    finally:
        stop.set()
        if consumer is not None and consumer.is_alive():
            consumer.join(5)
            if consumer.is_alive():
                consumer.terminate()
        if api is not None:
            api.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = c.Report("dispatch")
    c.print_machine(report.machine)
    print(f"{args.jobs} jobs per run (+{args.warmup} warm-up), one at a time, {args.gap_ms} ms apart; "
          f"API workers {args.workers}; body {BODY}")
    order = ("api", "pg", "rmq", "consumer", "bench")

    def one(_: None, attempt: int) -> dict:
        label = f"a{attempt}"
        run = one_run(args, label)
        d, a, h = run["submit_to_delivery_ms"], run["after_202_to_delivery_ms"], run["post_to_202_ms"]
        print(f"{label}: submit→delivery p50 {d['p50']} p99 {d['p99']} max {d['max']} ms; "
              f"202→delivery p50 {a['p50']} p99 {a['p99']} ms ({run['delivered_before_202']}/{run['jobs']} "
              f"delivered before the 202); POST→202 p50 {h['p50']} p99 {h['p99']} ms; CPU api/pg/rmq/consumer/bench "
              f"{c.fmt_cpu(run['cpu'], order)} other {run['cpu']['other']:.0f} "
              f"({'clean' if run['clean'] else 'DISTURBED'}); load {run['loadavg_before']}"
              + (f"; PROBLEMS: {run['problems']}" if run["problems"] else ""), flush=True)
        report.problems += [f"{label}: {p}" for p in run["problems"]]
        return run

    report.runs = c.interleaved([None], args.runs, args.max_attempts, one)
    runs, used = c.usable(report.runs)
    keys = ("submit_to_delivery_ms", "after_202_to_delivery_ms", "post_to_202_ms")
    print(f"\nmedians of the runs' percentiles (ms), {used}:")
    print("| measure | p50 | p90 | p99 | max | runs p50 / p99 |")
    print("|---|---|---|---|---|---|")
    for key in keys:
        row = {p: round(c.median(r[key][p] for r in runs), 2) for p in ("p50", "p90", "p99", "max")}
        row["runs"] = [(r[key]["p50"], r[key]["p99"]) for r in runs]
        report.summary.append({"measure": key, **row, "used": used})
        print(f"| {key} | {row['p50']} | {row['p90']} | {row['p99']} | {row['max']} | "
              f"{'; '.join(f'{a} / {b}' for a, b in row['runs'])} |")
    if report.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(report.problems))
    report.save(args.json)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
