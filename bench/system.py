#!/usr/bin/env python
"""Jobs per second through the whole horde, with workers that generate instantly.

Each run: a fresh database and vhost, ``horde api`` (``--api-workers`` uvicorn processes) and
``horde ledger`` as real processes, and ``--workers`` fake workers in a child process. The fake
workers speak the real AMQP protocol with the horde's own client code: like a real worker they
read no model queue but *ask* the API's dispatcher for jobs (``ask.<worker>``, direct reply-to,
``consumers.claims.ClaimClient.next_offer``), which answers with a job already leased to them;
each keeps asking while it holds fewer than ``--prefetch`` jobs, and publishes a
``job-completed.v1`` with its ``user_id`` (confirmed, persistent) carrying a tiny fixed WebP:
generation costs nothing, so what is measured is the horde itself.

The clock runs from the first submission (``--jobs`` jobs over HTTP, ``--clients`` concurrent
connections, anonymous) until the ledger has settled every job: submit -> model queue ->
dispatcher (held, matched to an ask, leased) -> offer -> completion event -> result stored ->
``job.done`` -> settled. It prints jobs/s, and checks that every accepted job is ``done`` with a
stored result, settled exactly once (4 entries per priced job, one inbox row per job), that
``ledger.report.reconcile`` is clean, that the fake workers completed exactly one job per accepted
request without an error, and that the model, results, ledger and dead-letter queues are empty.
Exit 1 if a check failed. How often the dispatcher said "not now" (a worker at its lease cap,
``HORDE_MAX_LEASES_PER_WORKER``) is reported: that is back-pressure, not a fault.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    from bench import _common as c
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]

register_workers = c.register_workers  # bench/simulation.py imports it from here

#: No aging and no republishing during a run: they would add copies of waiting jobs.
STEADY = {"aging_seconds": 0, "republish_after_seconds": 86_400}
IMAGE = {"width": 64, "height": 64, "steps": 4}
#: HORDE_MAX_LEASES_PER_WORKER's default: live leases the dispatcher lets one worker hold.
MAX_LEASES = 3
#: broker.messages.MAX_ASK_AMOUNT: the most jobs one ask may ask for.
MAX_PREFETCH = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Jobs/s through the whole horde (HTTP submit to ledger settlement) with instant fake workers.",
        epilog="example: python bench/system.py --jobs 20000 --workers 20 --api-workers 2 --runs 3 "
               "--json /tmp/system.json",
    )
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per run (default 20000)")
    p.add_argument("--workers", type=int, default=20, help="fake workers (default 20)")
    p.add_argument("--prefetch", type=int, default=2,
                   help="jobs each fake worker holds at once: it asks for another while it holds fewer "
                        "(default 2; above 3, HORDE_MAX_LEASES_PER_WORKER's default, the horde is started "
                        "with that cap raised to it)")
    p.add_argument("--images", type=int, default=1,
                   help="images per submission (AI Horde's params.n; default 1): a job is one image, so "
                        "--jobs 10000 --images 4 sends 2500 submissions")
    p.add_argument("--rate", type=float, default=0.0,
                   help="submissions per second, paced (default 0: as fast as the API answers, which "
                        "queues most jobs ahead of the workers)")
    p.add_argument("--ask-for-room", action="store_true",
                   help="each fake worker asks for as many jobs as it has room for (JobAsk.amount), in one "
                        "ask and one offer, instead of one at a time")
    p.add_argument("--hold", type=int, default=8,
                   help="HORDE_DISPATCH_HOLD (default 8, the horde's): jobs of a model the dispatcher holds "
                        "to choose from, so also the most one offer can carry")
    p.add_argument("--clients", type=int, default=64, help="concurrent HTTP connections submitting (default 64)")
    p.add_argument("--api-workers", type=int, default=2, help="HORDE_API_WORKERS (default 2)")
    p.add_argument("--ledger-prefetch", type=int, default=1000, help="HORDE_LEDGER_PREFETCH (default 1000)")
    p.add_argument("--model", default="tiny-sd", help="the model every job asks for (default tiny-sd)")
    p.add_argument("--runs", type=int, default=1, help="runs (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up a run after this many seconds (default 600)")
    p.add_argument("--json", help="write all results as JSON to this file")
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 1_000_000 or not 1 <= args.workers <= 2000 or not 1 <= args.runs <= 20:
        p.error("keep --jobs in 1..1000000, --workers in 1..2000, --runs in 1..20")
    if not 1 <= args.clients <= 1024 or not 1 <= args.prefetch <= MAX_PREFETCH:
        p.error(f"keep --clients in 1..1024 and --prefetch in 1..{MAX_PREFETCH}")
    if not 1 <= args.images <= 20 or args.jobs % args.images:
        p.error("keep --images in 1..20 (AI Horde's limit on n), dividing --jobs")
    return args


# --- fake workers -----------------------------------------------------------------------------------


@dataclass
class FleetStats:
    received: int = 0  # jobs leased to a fake worker
    offers: int = 0  # the offers that brought them (one job each, or several with ask_for_room)
    not_now: int = 0  # asks answered "not now" (the worker at its lease cap, or paused)
    completed: int = 0
    errors: int = 0
    heartbeats: int = 0
    #: (time.monotonic() when the offer came, seconds the ask waited for it), one per offer: how long
    #: a worker ready for a job waited for one (monotonic clocks agree across processes on Linux).
    ask_waits: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class FleetPlan:
    amqp_url: str
    workers: dict[str, list[str]]  # worker name -> the models it serves
    prefetch: int  # jobs a worker holds at once, from offer to completion: it asks while it holds fewer
    generate_seconds: float = 0.0
    heartbeat_seconds: float = 0.0  # 0: no heartbeats
    jobs_at_once: int = 0  # of those, generating at once (a GPU does one); 0: all of them
    workers_per_connection: int = 50
    ask_refresh_seconds: float = 10.0  # HORDE_ASK_REFRESH_SECONDS: a waiting ask is repeated this often
    ask_for_room: bool = False  # ask for as many jobs as there is room for (JobAsk.amount), not one


class FakeWorker:
    """One worker: its own channel (direct reply-to answers the channel that asked), the real ask
    client and publisher, and no generation: a fixed WebP after ``generate_seconds``.

    The dispatcher keeps one ask per worker (a new one replaces the old), so a worker has one ask
    outstanding at a time; it asks again as soon as an offer arrives while it holds fewer than
    ``prefetch`` jobs, which is what prefetch was for a queue consumer."""

    def __init__(self, name: str, models: list[str], plan: FleetPlan, stats: FleetStats, image: bytes) -> None:
        self.name, self.models, self.plan, self.stats, self.image = name, models, plan, stats, image
        self._publisher: Any = None
        self._claims: Any = None
        self._capabilities = c.image_capabilities(models)
        self._held = asyncio.Semaphore(plan.prefetch)
        self._device = asyncio.Semaphore(plan.jobs_at_once) if plan.jobs_at_once else None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, connection: Any) -> None:
        from broker.amqp import Publisher, amqp_user
        from consumers.claims import ClaimClient

        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._publisher = Publisher(channel, user_id=amqp_user(self.plan.amqp_url))
        self._claims = ClaimClient(channel, self._publisher, worker=self.name, timeout=60,
                                   ask_refresh=self.plan.ask_refresh_seconds)
        await self._claims.start()

    async def ask(self, stop: asyncio.Event) -> None:
        """Ask for a job whenever fewer than ``prefetch`` are in hand, until ``stop``; then let the
        jobs in hand finish."""
        from consumers.errors import OfferWithdrawn

        try:
            while not stop.is_set():
                await self._held.acquire()
                asked = time.monotonic()
                # This one and the room left besides it; the offer's further jobs are taken below.
                amount = 1 + self._room() if self.plan.ask_for_room else 1
                try:
                    offer = await self._claims.next_offer(self._capabilities, stop, amount)
                except OfferWithdrawn as exc:
                    self._held.release()
                    self.stats.not_now += 1
                    await _sleep_unless(stop, exc.retry_after)
                    continue
                except Exception as exc:  # counted and shown: a benchmark must not hide a failure
                    self._held.release()
                    self._error(exc)
                    await _sleep_unless(stop, 1.0)
                    continue
                if offer is None:  # stopping
                    self._held.release()
                    return
                batch = [offer]
                if self.plan.ask_for_room:  # the rest of the offer, done and sent back together
                    batch += self._claims.take_offers()
                    for _ in batch[1:]:
                        await self._held.acquire()  # free: asked for only as much as there was room
                self.stats.received += len(batch)
                self.stats.offers += 1
                now = time.monotonic()
                self.stats.ask_waits.append((now, now - asked))
                task = asyncio.create_task(self._work(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(functools.partial(_release, self._held, len(batch)))
        finally:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)
            await self._give_back_unstarted()

    def _room(self) -> int:
        """Jobs this worker may take besides the one it is asking for."""
        return self._held._value  # noqa: SLF001 (asyncio.Semaphore has no public count)

    async def _give_back_unstarted(self) -> None:
        """Offers that came after the last ask was taken are leased to us: hand them back, as a real
        worker does when it stops (else they wait for their lease to expire)."""
        for offer in self._claims.take_offers():
            try:
                await self._claims.claim(offer.job.job_id, offer.model, decline=True, lease_id=offer.lease_id)
            except Exception as exc:
                self._error(exc)

    async def _work(self, batch: list[Any]) -> None:
        if self._device is None:
            await self._complete(batch)
            return
        async with self._device:  # the next job generates only once the device is free
            await self._complete(batch)

    async def _complete(self, batch: list[Any]) -> None:
        """Send the results of a batch: one ``job-completed.v1``, or one ``jobs-completed.v1`` for several."""
        from broker.messages import JobCompleted, JobsCompleted
        from broker.topology import EVENTS_EXCHANGE, completed_key

        try:
            if self.plan.generate_seconds:
                await asyncio.sleep(self.plan.generate_seconds)
            results = [JobCompleted(job_id=offer.job.job_id, lease_id=offer.lease_id, worker=self.name,
                                    model=offer.model, seed=str(offer.job.params.seed or 0), image=self.image,
                                    width=64, height=64, generation_seconds=self.plan.generate_seconds)
                       for offer in batch]
            message = results[0] if len(results) == 1 else JobsCompleted(completions=results)
            await self._publisher.publish(EVENTS_EXCHANGE, completed_key(self.name), message,
                                          message_id=uuid.uuid4().hex)
            self.stats.completed += len(results)
        except Exception as exc:  # counted and shown: a benchmark must not hide a failure
            self._error(exc)

    def _error(self, exc: BaseException) -> None:
        self.stats.errors += 1
        if self.stats.errors <= 5:
            print(f"fake worker {self.name}: {exc!r}", file=sys.stderr, flush=True)

    async def beat(self, stop: asyncio.Event) -> None:
        from datetime import datetime, timezone

        from broker.messages import WorkerHeartbeat
        from broker.topology import EVENTS_EXCHANGE, heartbeat_key

        started = time.monotonic()
        while not stop.is_set():
            beat = WorkerHeartbeat(worker=self.name, models=self.models, loaded_models=self.models, state="busy",
                                   jobs_done=0, device="fake", uptime_seconds=round(time.monotonic() - started, 1),
                                   sent_at=datetime.now(timezone.utc))
            try:
                await self._publisher.publish(EVENTS_EXCHANGE, heartbeat_key(self.name), beat,
                                              message_id=uuid.uuid4().hex, persistent=False)
                self.stats.heartbeats += 1
            except Exception:  # a missed heartbeat is replaced by the next one
                pass
            try:
                await asyncio.wait_for(stop.wait(), self.plan.heartbeat_seconds)
            except TimeoutError:
                pass


def _release(slots: asyncio.Semaphore, n: int, _task: object) -> None:
    for _ in range(n):
        slots.release()


def ask_wait_summary(waits: list[tuple[float, float]], since: float = float("-inf"),
                     until: float = float("inf")) -> dict[str, Any]:
    """p50/p90/p99/max (ms) of the asks answered with an offer between ``since`` and ``until``."""
    ms = [wait * 1000 for at, wait in waits if since <= at <= until]
    if not ms:
        return {"offers": 0}
    return {"offers": len(ms), "p50_ms": round(c.percentile(ms, 50), 1), "p90_ms": round(c.percentile(ms, 90), 1),
            "p99_ms": round(c.percentile(ms, 99), 1), "max_ms": round(max(ms), 1)}


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def run_fleet(plan: FleetPlan, ready: Any, stop: Any) -> FleetStats:
    """Start every fake worker, set ``ready``, and serve until ``stop`` (a multiprocessing Event)."""
    from broker.amqp import connect

    stats, image = FleetStats(), c.tiny_webp()
    names = list(plan.workers)
    connections = []
    stopping = asyncio.Event()
    beats: list[asyncio.Task[None]] = []
    asking: list[asyncio.Task[None]] = []
    try:
        for i in range(0, len(names), plan.workers_per_connection):
            connection = await connect(plan.amqp_url, name=f"bench-fake-workers-{i}")
            connections.append(connection)
            group = [FakeWorker(n, plan.workers[n], plan, stats, image)
                     for n in names[i:i + plan.workers_per_connection]]
            await asyncio.gather(*(w.start(connection) for w in group))
            asking += [asyncio.create_task(w.ask(stopping)) for w in group]
            if plan.heartbeat_seconds:
                beats += [asyncio.create_task(w.beat(stopping)) for w in group]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
    finally:
        stopping.set()
        await asyncio.gather(*asking, *beats, return_exceptions=True)
        for connection in connections:
            await connection.close()
    return stats


def fleet_process(plan: FleetPlan, ready: Any, stop: Any, results: Any) -> None:
    """Child process entry point: the fleet's statistics go back through ``results``."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results.put(asdict(asyncio.run(run_fleet(plan, ready, stop))))


class Fleet:
    """The fake workers in a child process (they do not share the load generator's CPU or GIL)."""

    def __init__(self, plan: FleetPlan) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._stop, self._results = ctx.Event(), ctx.Event(), ctx.Queue()
        self.process = ctx.Process(target=fleet_process, args=(plan, self._ready, self._stop, self._results),
                                   daemon=True)
        self.process.start()

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            self.process.terminate()
            raise RuntimeError(f"the fake workers did not start within {timeout}s")

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def stop(self) -> dict[str, int]:
        self._stop.set()
        try:
            stats = self._results.get(timeout=60)
        finally:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
        return stats


# --- submitting -----------------------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, as little client as a load generator needs.

    Not httpx: its async pool spends more CPU per request than the API does, and collapses with
    dozens of connections (measured on the 2-core machine: 133 heartbeats/s over 64 connections,
    the API 4% busy, the client 73%), so it would measure itself.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", apikey: str = "0000000000") -> None:
        self._host, self._port, self._apikey = host, port, apikey
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body); one reconnect if the server closed the idle connection."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\napikey: {self._apikey}\r\n"
                + (f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n" if body is not None
                   else "") + "\r\n").encode()
        for attempt in (1, 2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
            assert self._reader is not None
            self._writer.write(head + payload)
            status_line = await self._reader.readline()
            if status_line:
                return int(status_line.split()[1]), await self._read_body(self._reader)
            self.close()
            if attempt == 2:
                raise ConnectionError(f"{method} {path}: the server closed the connection")
        raise AssertionError("unreachable")

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader) -> bytes:
        length, chunked = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return await reader.readexactly(length)
        parts = []
        while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
            parts.append(await reader.readexactly(size))
            await reader.readline()
        await reader.readline()
        return b"".join(parts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def submit_all(port: int, jobs: int, clients: int, body: dict[str, Any],
                     rate: float = 0.0) -> tuple[list[str], list[str]]:
    """POST ``jobs`` submissions over ``clients`` connections, as fast as they are answered or, with
    ``rate``, the i-th at ``i / rate`` seconds (open loop); (request ids accepted, problems)."""
    ids: list[str] = []
    problems: list[str] = []
    remaining = iter(range(jobs))
    start = time.monotonic()

    async def client() -> None:
        http = HttpConnection(port)
        try:
            for i in remaining:
                if rate and (due := start + i / rate - time.monotonic()) > 0:
                    await asyncio.sleep(due)
                try:
                    status, answer = await http.request("POST", "/api/v2/generate/async", body)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    problems.append(f"submit failed: {exc!r}")
                    http.close()
                    continue
                if status == 202:
                    ids.append(json.loads(answer)["id"])
                else:
                    problems.append(f"submit answered {status}: {answer[:200]!r}")
        finally:
            http.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return ids, problems


# --- one run ----------------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, label: str) -> dict[str, Any]:
    import psycopg2

    from broker.topology import DEAD_QUEUE, LEDGER_QUEUE, RESULTS_QUEUE, job_queue
    from config.database import make_sync_engine
    from ledger.report import reconcile

    stack = c.Stack.create()
    api = ledger = fleet = None
    try:
        names = [f"bench-fake-{i}" for i in range(args.workers)]
        register_workers(stack.database_url, names, stack.rabbitmq_url)
        port = c.free_port()
        # requester limits off; a worker may hold its prefetch
        api = c.start_api(stack, port, workers=args.api_workers, max_leases_per_worker=max(MAX_LEASES, args.prefetch),
                          dispatch_hold=args.hold, **STEADY)
        ledger = c.HordeProcess("ledger", ["ledger"], stack.env(ledger_prefetch=args.ledger_prefetch,
                                                                log_level="INFO"), stack.state_dir)
        ledger.wait_for(lambda: "ledger consumer ready" in ledger.log(), 60, "the ledger to start")
        fleet = Fleet(FleetPlan(stack.rabbitmq_url, {n: [args.model] for n in names}, args.prefetch,
                                ask_for_room=args.ask_for_room))
        fleet.wait_ready(120)

        pg = psycopg2.connect(stack.database_url)
        pg.autocommit = True
        cur = pg.cursor()

        def settled() -> int:
            cur.execute("SELECT count(*) FROM ledger_inbox WHERE message_id LIKE 'job-done:%%'")
            return cur.fetchone()[0]

        body = {"prompt": "a lighthouse", "models": [args.model], "params": {**IMAGE, "n": args.images}}
        window = c.CpuWindow({"api": api.pid, "ledger": ledger.pid, "fleet": fleet.pid},
                             singles={"bench": os.getpid()}).start()
        start = time.monotonic()
        ids, problems = asyncio.run(submit_all(port, args.jobs // args.images, args.clients, body, args.rate))
        jobs = len(ids) * args.images
        submitted = time.monotonic()
        deadline = start + args.timeout
        count = 0
        while time.monotonic() < deadline and api.alive() and ledger.alive():
            count = settled()
            if count >= jobs:
                break
            # The count reads the whole inbox: polled finely only near the end, so that the
            # benchmark does not take PostgreSQL's CPU from the horde it measures.
            time.sleep(0.05 if count >= 0.98 * jobs else 0.5)
        finished = time.monotonic()
        cpu = window.stop()
        fleet_stats = fleet.stop()
        fleet_stats["ask_wait"] = ask_wait_summary(fleet_stats.pop("ask_waits"))
        fleet = None

        # --- verification ---
        cur.execute("SELECT state, count(*), count(result_path), count(*) FILTER (WHERE price > 0) FROM jobs "
                    "GROUP BY state")
        states = {state: (n, with_result, priced) for state, n, with_result, priced in cur.fetchall()}
        cur.execute("SELECT count(*) FROM (SELECT job_id FROM ledger_entries WHERE kind IN ('generation', 'tax') "
                    "GROUP BY job_id HAVING count(*) <> 4) AS odd")
        odd_jobs = cur.fetchone()[0]
        cur.execute("SELECT count(DISTINCT job_id), count(*) FROM ledger_entries WHERE job_id IS NOT NULL")
        settled_jobs, entry_rows = cur.fetchone()
        cur.execute("SELECT count(*) FROM jobs WHERE request_id = ANY(%s)", (ids,))
        accepted_rows = cur.fetchone()[0]
        inbox = settled()
        pg.close()
        done, with_result, priced = states.get("done", (0, 0, 0))
        if problems:
            problems = [f"{len(problems)} submissions failed, e.g. {problems[0]}"]
        if jobs != args.jobs:
            problems.append(f"{len(ids)} of {args.jobs // args.images} submissions accepted")
        if accepted_rows != jobs or done != jobs or with_result != done:
            problems.append(f"jobs by state {states}; {accepted_rows} rows for {len(ids)} accepted requests")
        if inbox != done or settled_jobs != priced or odd_jobs or entry_rows != 4 * priced:
            problems.append(f"ledger: inbox {inbox}, settled jobs {settled_jobs}, entries {entry_rows} for {done} "
                            f"done ({priced} priced), {odd_jobs} jobs without exactly 4 entries")
        engine = make_sync_engine(stack.database_url)
        try:
            with engine.connect() as conn:
                drift = reconcile(conn)
        finally:
            engine.dispose()
        if drift:
            problems.append(f"reconcile: {drift[:3]}")
        if fleet_stats["errors"] or fleet_stats["completed"] != jobs or fleet_stats["received"] != jobs:
            problems.append(f"fake workers: {fleet_stats}")
        left = {q: c.queue_depth(stack.rabbitmq_url, q)[0]
                for q in (job_queue(args.model), RESULTS_QUEUE, LEDGER_QUEUE, DEAD_QUEUE)}
        if any(left.values()):
            problems.append(f"messages left in queues: {left}")
        for process in (api, ledger):
            if " ERROR " in process.log() or "Traceback" in process.log():
                problems.append(f"{process.name} logged errors: {process.log()[-1500:]}")
        seconds = finished - start
        return {
            "label": label, "jobs": jobs, "submissions": len(ids), "seconds": round(seconds, 3),
            "jobs_s": round(jobs / seconds, 1), "submit_s": round(submitted - start, 3),
            "accepted_s": round(jobs / max(1e-9, submitted - start), 1), "settled": inbox,
            "fleet": fleet_stats, "cpu": cpu, "problems": problems, "loadavg_after": c.loadavg(),
        }
    finally:
        if fleet is not None:
            fleet.stop()
        for process in (ledger, api):
            if process is not None:
                process.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = c.Report("system")
    c.print_machine(report.machine)
    print(f"{args.jobs} jobs per run ({args.model}, 64x64, anonymous, {args.images} per submission) "
          f"from {args.clients} HTTP connections; "
          f"{args.workers} instant fake workers asking the dispatcher, {args.prefetch} job(s) in hand each; "
          f"{args.api_workers} API worker(s); ledger prefetch {args.ledger_prefetch}")
    order = ("api", "ledger", "fleet", "pg", "rmq", "bench")
    for number in range(1, args.runs + 1):
        run = one_run(args, f"run{number}")
        report.runs.append(run)
        report.problems += [f"{run['label']}: {p}" for p in run["problems"]]
        verdict = "verified: every job done and settled once, reconcile clean" if not run["problems"] else "PROBLEMS"
        print(f"{run['label']}: {run['jobs_s']:,.0f} jobs/s end to end ({run['jobs']} jobs submitted, done and "
              f"settled in {run['seconds']} s; accepted at {run['accepted_s']:,.0f}/s); "
              f"CPU api/ledger/fleet/pg/rmq/bench {c.fmt_cpu(run['cpu'], order)} other {run['cpu']['other']:.0f}; "
              + (f"{run['fleet']['not_now']} asks answered 'not now'; " if run["fleet"]["not_now"] else "")
              + (f"{run['fleet']['received'] / max(1, run['fleet']['offers']):.2f} jobs an offer; "
                 if args.ask_for_room else "")
              + verdict,
              flush=True)
    rates = [r["jobs_s"] for r in report.runs]
    report.summary.append({"jobs_s_median": c.median(rates), "runs": rates})
    print(f"\nmedian: {c.median(rates):,.0f} jobs/s over {len(rates)} run(s): {', '.join(f'{x:,.0f}' for x in rates)}")
    if report.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(report.problems))
    report.save(args.json)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
