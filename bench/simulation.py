#!/usr/bin/env python
"""A horde at scale: many simulated workers over many models and a deep backlog; memory and API latency.

One run: a fresh database and vhost; a model reference of ``--models`` image models; ``horde api``
(``--api-workers`` processes) and ``horde ledger``; ``--workers`` fake workers (bench/system.py:
the real AMQP protocol, asking the API's dispatcher for jobs with direct reply-to, completions
with their user_id, heartbeats every ``--heartbeat-seconds``) each serving ``--models-per-worker``
models, holding one job at a time (they ask for the next once it is done) and "generating" it for
``--generate-seconds`` (a fixed tiny WebP). The backlog waits in the model queues; the dispatcher
takes jobs out only for workers that wait.

1. **Fill:** ``--jobs`` jobs are submitted over HTTP (``--fill-n`` images per request, models in
   turn) before any worker starts, so the queues hold the whole backlog.
2. **Load:** the workers start; after ``--warmup`` seconds, for ``--duration`` seconds an open-loop
   load generator sends submissions at ``--submit-rate``/s and status calls (``/generate/check`` and
   ``/generate/status`` of random requests, alternately) at ``--status-rate``/s, timing each one.
   Memory is sampled every 5 s.
3. **Report:** the resident memory (RSS) of each horde process: every API process, the ledger, the
   fake workers' process, RabbitMQ's VM (``rabbitmqctl status``, else /proc; shared with anything
   else on the broker, so this vhost's queues are also given apart from the management API) and
   PostgreSQL (proportional set size, summed over its processes: shared buffers counted once);
   p50/p90/p99/max of the submit and status calls; jobs done and settled meanwhile.
4. **Check:** no API call failed, and once the workers stop the ledger settles every done job
   exactly once (inbox = done jobs, 4 entries each) and ``reconcile`` is clean. Exit 1 otherwise.

Full scale is the default (500 workers, 50 models, 100,000 jobs); ``--workers 50 --models 10
--jobs 5000 --duration 20`` is a quick check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as c
    from bench.system import IMAGE, STEADY, Fleet, FleetPlan, HttpConnection, ask_wait_summary, register_workers
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]
    from system import (  # type: ignore[no-redef]
        IMAGE, STEADY, Fleet, FleetPlan, HttpConnection, ask_wait_summary, register_workers)

import httpx  # noqa: E402

#: A keep-alive connection idle longer than this is not reused (uvicorn closes them after 5 s).
KEEP_ALIVE_REUSE_SECONDS = 4.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Memory of each horde process and API latency with many workers, models and queued jobs.",
        epilog="full scale: python bench/simulation.py --json /tmp/simulation.json; quick check: "
               "python bench/simulation.py --workers 50 --models 10 --jobs 5000 --duration 20",
    )
    p.add_argument("--workers", type=int, default=500, help="simulated workers (default 500)")
    p.add_argument("--models", type=int, default=50, help="image models in the reference (default 50)")
    p.add_argument("--models-per-worker", type=int, default=2, help="models each worker serves (default 2)")
    p.add_argument("--jobs", type=int, default=100_000, help="jobs queued before the workers start (default 100000)")
    p.add_argument("--fill-n", type=int, default=20, help="images per fill request (default 20, the API's cap)")
    p.add_argument("--fill-clients", type=int, default=32, help="HTTP connections filling (default 32)")
    p.add_argument("--generate-seconds", type=float, default=5.0,
                   help="simulated generation time per job (default 5: 500 workers do ~100 jobs/s)")
    p.add_argument("--heartbeat-seconds", type=float, default=5.0, help="worker heartbeat period (default 5)")
    p.add_argument("--warmup", type=float, default=10.0,
                   help="seconds between workers ready and measuring (default 10)")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds under load (default 60)")
    p.add_argument("--submit-rate", type=float, default=20.0,
                   help="submissions per second while measuring (default 20)")
    p.add_argument("--status-rate", type=float, default=50.0,
                   help="status calls per second while measuring (default 50)")
    p.add_argument("--api-workers", type=int, default=2, help="HORDE_API_WORKERS (default 2)")
    p.add_argument("--aging-seconds", type=float, default=0.0,
                   help="HORDE_AGING_SECONDS: raise waiting jobs a tier per this many seconds, as a horde does "
                        "(default 0: off, so that no copies of waiting jobs are added; the horde's default is 120)")
    p.add_argument("--json", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if not 1 <= args.models_per_worker <= args.models or not 1 <= args.fill_n <= 20:
        p.error("--models-per-worker must be in 1..--models and --fill-n in 1..20")
    if min(args.workers, args.models, args.jobs) < 1 or args.duration <= 0:
        p.error("--workers, --models and --jobs must be positive, and --duration too")
    return args


def model_names(count: int) -> list[str]:
    return [f"sim-model-{i:03d}" for i in range(count)]


def write_reference(path: Path, models: list[str]) -> Path:
    path.write_text(json.dumps([{"name": m, "kind": "image", "baseline": "stable_diffusion_1"} for m in models]))
    return path


# --- memory ---------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of one process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pss_mib(pid: int) -> float:
    """Proportional set size in MiB: shared pages divided among the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pids_named(*names: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if comm in names or any(comm.startswith(n) for n in names if n.endswith("*")):
                out.append(int(entry))
    return out


def rabbitmq_memory() -> dict[str, Any]:
    """RabbitMQ's own view (``rabbitmqctl status``) if it can be asked, else the beam's RSS."""
    try:
        done = subprocess.run(["rabbitmqctl", "status", "--formatter", "json"], capture_output=True, text=True,
                              timeout=30)
        status = json.loads(done.stdout)
        total = status["memory"]["total"]
        return {"source": "rabbitmqctl status", "rss_mib": round(total["rss"] / 2**20, 1),
                "erlang_mib": round(total["erlang"] / 2**20, 1)}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        beams = pids_named("beam.smp")
        return {"source": "/proc (beam.smp)", "rss_mib": round(sum(rss_mib(p) for p in beams), 1)}


def vhost_queue_memory(amqp_url: str) -> dict[str, Any]:
    """This vhost's queues as the management API sees them: messages and memory (stats lag a few s)."""
    vhost = amqp_url.rsplit("/", 1)[1]
    try:
        with httpx.Client(base_url=c.RABBIT_MGMT, auth=c.RABBIT_ADMIN, timeout=30) as http:
            queues = http.get(f"/api/queues/{vhost}", params={"columns": "name,messages,memory"}).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {"queues": len(queues), "messages": sum(q.get("messages") or 0 for q in queues),
            "memory_mib": round(sum(q.get("memory") or 0 for q in queues) / 2**20, 1)}


def role(pid: int) -> str:
    """What a process of ``horde api``'s tree is: uvicorn's supervisor, a worker, or the resource tracker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "resource_tracker" in cmdline:
        return "resource-tracker"
    return "worker" if "spawn_main" in cmdline else "main"


def memory(api_pid: int, ledger_pid: int, fleet_pid: int, amqp_url: str) -> dict[str, Any]:
    api_pids = sorted(c.process_tree(api_pid))
    return {
        "api_mib": {f"{p} {role(p)}": round(rss_mib(p), 1) for p in api_pids},
        "api_total_mib": round(sum(rss_mib(p) for p in api_pids), 1),
        "ledger_mib": round(rss_mib(ledger_pid), 1),
        "fake_workers_mib": round(rss_mib(fleet_pid), 1),
        "rabbitmq": rabbitmq_memory(),
        "rabbitmq_vhost": vhost_queue_memory(amqp_url),
        "postgres_pss_mib": round(sum(pss_mib(p) for p in pids_named("postgres")), 1),
    }


# --- load -----------------------------------------------------------------------------------------


async def fill(port: int, models: list[str], jobs: int, n: int, clients: int) -> tuple[list[str], list[str]]:
    """Queue ``jobs`` jobs, ``n`` per request, models in turn; (request ids, problems)."""
    sizes = [n] * (jobs // n) + ([jobs % n] if jobs % n else [])
    work = iter(enumerate(sizes))
    ids: list[str] = []
    problems: list[str] = []

    async def client() -> None:
        http = HttpConnection(port)
        try:
            for i, size in work:
                body = {"prompt": f"backlog {i}", "models": [models[i % len(models)]], "params": {**IMAGE, "n": size}}
                try:
                    status, answer = await http.request("POST", "/api/v2/generate/async", body)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    problems.append(repr(exc))
                    http.close()
                    continue
                if status == 202:
                    ids.append(json.loads(answer)["id"])
                else:
                    problems.append(f"{status}: {answer[:200]!r}")
        finally:
            http.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return ids, problems


async def load(port: int, models: list[str], request_ids: list[str], args: argparse.Namespace,
               rng: random.Random) -> dict[str, list[tuple[float, int]]]:
    """Open loop: calls start on schedule whether or not earlier ones have answered (each on an idle
    keep-alive connection, or a new one). Returns the (seconds, HTTP status) of every call, by
    kind (-1: no answer)."""
    timings: dict[str, list[tuple[float, int]]] = {"submit": [], "check": [], "status": []}
    idle: list[tuple[HttpConnection, float]] = []  # with when each was last used
    pending: set[asyncio.Task[None]] = set()

    def connection() -> HttpConnection:
        # uvicorn closes a keep-alive connection idle for 5 s; one reused just then fails with no
        # answer, a race of the client's, not the horde's: such connections are not reused.
        while idle:
            http, used = idle.pop()
            if time.perf_counter() - used < KEEP_ALIVE_REUSE_SECONDS:
                return http
            http.close()
        return HttpConnection(port)

    async def call(kind: str, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        http = connection()
        start = time.perf_counter()
        try:
            status, answer = await http.request(method, path, body)
            if kind == "submit" and status == 202:
                request_ids.append(json.loads(answer)["id"])
            idle.append((http, time.perf_counter()))
        except (OSError, asyncio.IncompleteReadError):
            status = -1
            http.close()
        timings[kind].append((time.perf_counter() - start, status))

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def every(rate: float, make: Any) -> None:
        if rate <= 0:
            return
        period, due, end = 1.0 / rate, time.perf_counter(), time.perf_counter() + args.duration
        flip = 0
        while due < end:
            spawn(make(flip))
            flip += 1
            due += period
            await asyncio.sleep(max(0.0, due - time.perf_counter()))

    def submit(_: int) -> Any:
        body = {"prompt": "a load test", "models": [rng.choice(models)], "params": IMAGE}
        return call("submit", "POST", "/api/v2/generate/async", body)

    def status(flip: int) -> Any:
        request_id = rng.choice(request_ids)
        if flip % 2:
            return call("status", "GET", f"/api/v2/generate/status/{request_id}")
        return call("check", "GET", f"/api/v2/generate/check/{request_id}")

    try:
        await asyncio.gather(every(args.submit_rate, submit), every(args.status_rate, status))
        await asyncio.gather(*pending)
    finally:
        for http, _ in idle:
            http.close()
    return timings


def latency_summary(calls: list[tuple[float, int]]) -> dict[str, Any]:
    ok = [s * 1000 for s, status in calls if 200 <= status < 300]
    failed = [status for _, status in calls if not 200 <= status < 300]
    if not ok:
        return {"calls": len(calls), "failed": len(failed)}
    return {"calls": len(calls), "failed": len(failed), "p50_ms": round(c.percentile(ok, 50), 1),
            "p90_ms": round(c.percentile(ok, 90), 1), "p99_ms": round(c.percentile(ok, 99), 1),
            "max_ms": round(max(ok), 1), "statuses": sorted(set(failed))}


# --- the run ----------------------------------------------------------------------------------------


def counts(cur: Any) -> dict[str, int]:
    # Settlements first: a job is done before it is settled, so reading them in this order can
    # never show more settled than done while late completions are still landing.
    cur.execute("SELECT count(*) FROM ledger_inbox WHERE message_id LIKE 'job-done:%%'")
    settled = cur.fetchone()[0]
    cur.execute("SELECT state, count(*) FROM jobs GROUP BY state")
    return {**{state: n for state, n in cur.fetchall()}, "settled": settled}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg2

    from config.database import make_sync_engine
    from ledger.report import reconcile

    rng = random.Random(7)
    models = model_names(args.models)
    stack = c.Stack.create()
    api = ledger = fleet = None
    result: dict[str, Any] = {"problems": []}
    problems: list[str] = result["problems"]
    try:
        reference = write_reference(stack.state_dir / "models.json", models)
        names = [f"sim-worker-{i:04d}" for i in range(args.workers)]
        serves = {name: [models[(i * args.models_per_worker + k) % len(models)] for k in range(args.models_per_worker)]
                  for i, name in enumerate(names)}
        register_workers(stack.database_url, names, stack.rabbitmq_url)
        port = c.free_port()
        base_url = f"http://127.0.0.1:{port}"
        api = c.start_api(stack, port, workers=args.api_workers, model_reference=reference,
                          **{**STEADY, "aging_seconds": args.aging_seconds})
        ledger = c.HordeProcess("ledger", ["ledger"], stack.env(model_reference=reference, log_level="INFO"),
                                stack.state_dir)
        ledger.wait_for(lambda: "ledger consumer ready" in ledger.log(), 60, "the ledger to start")
        pg = psycopg2.connect(stack.database_url)
        pg.autocommit = True
        cur = pg.cursor()

        start = time.monotonic()
        request_ids, fill_problems = asyncio.run(fill(port, models, args.jobs, args.fill_n, args.fill_clients))
        result["fill"] = {"seconds": round(time.monotonic() - start, 1), "requests": len(request_ids),
                          "jobs_s": round(args.jobs / (time.monotonic() - start), 1)}
        if fill_problems:
            problems.append(f"{len(fill_problems)} fill requests failed, e.g. {fill_problems[0]}")
        print(f"filled {args.jobs} jobs in {result['fill']['seconds']} s ({result['fill']['jobs_s']:,.0f} jobs/s); "
              f"counts {counts(cur)}", flush=True)

        start = time.monotonic()
        fleet = Fleet(FleetPlan(stack.rabbitmq_url, serves, prefetch=1, generate_seconds=args.generate_seconds,
                                heartbeat_seconds=args.heartbeat_seconds, jobs_at_once=1,
                                workers_per_connection=50))
        fleet.wait_ready(600)
        result["workers_ready_s"] = round(time.monotonic() - start, 1)
        print(f"{args.workers} workers ready in {result['workers_ready_s']} s", flush=True)
        time.sleep(args.warmup)

        memory_before = memory(api.pid, ledger.pid, fleet.pid, stack.rabbitmq_url)
        before = counts(cur)
        window = c.CpuWindow({"api": api.pid, "ledger": ledger.pid, "fleet": fleet.pid},
                             singles={"bench": os.getpid()}).start()
        samples: list[dict[str, Any]] = []
        stop_sampling = False

        async def sample_memory() -> None:
            while not stop_sampling:
                await asyncio.sleep(5)
                samples.append(await asyncio.to_thread(memory, api.pid, ledger.pid, fleet.pid, stack.rabbitmq_url))

        async def measure() -> dict[str, list[tuple[float, int]]]:
            nonlocal stop_sampling
            sampler = asyncio.create_task(sample_memory())
            try:
                return await load(port, models, request_ids, args, rng)
            finally:
                stop_sampling = True
                await sampler

        measured_from = time.monotonic()
        timings = asyncio.run(measure())
        measured_s = time.monotonic() - measured_from
        cpu = window.stop()
        after = counts(cur)
        memory_after = memory(api.pid, ledger.pid, fleet.pid, stack.rabbitmq_url)
        metrics_start = time.perf_counter()
        scrape = httpx.get(f"{base_url}/metrics", timeout=60)
        result["metrics_scrape_ms"] = round((time.perf_counter() - metrics_start) * 1000, 1)
        if scrape.status_code != 200:
            problems.append(f"/metrics answered {scrape.status_code}")
        result.update(
            measured_s=round(measured_s, 1), cpu=cpu, counts_before=before, counts_after=after,
            done_per_s=round((after.get("done", 0) - before.get("done", 0)) / measured_s, 1),
            latency={kind: latency_summary(calls) for kind, calls in timings.items()},
            memory_before=memory_before, memory_after=memory_after,
            memory_peak={"api_total_mib": max([s["api_total_mib"] for s in samples] or [0]),
                         "ledger_mib": max([s["ledger_mib"] for s in samples] or [0]),
                         "rabbitmq_rss_mib": max([s["rabbitmq"]["rss_mib"] for s in samples] or [0])},
        )
        for kind, summary in result["latency"].items():
            if summary["failed"]:
                problems.append(f"{summary['failed']} {kind} calls failed ({summary.get('statuses')})")
        result["fleet"] = fleet.stop()
        fleet = None
        # How long a worker free for its next job waited for it (each fake worker asks only when free).
        result["ask_wait"] = ask_wait_summary(result["fleet"].pop("ask_waits"), measured_from,
                                              measured_from + measured_s)
        if result["fleet"]["errors"]:
            problems.append(f"fake workers: {result['fleet']}")

        # Every job done so far must be settled once the ledger has caught up.
        deadline = time.monotonic() + 120
        final = counts(cur)
        while time.monotonic() < deadline and final["settled"] < final.get("done", 0):
            time.sleep(0.5)
            final = counts(cur)
        cur.execute("SELECT count(*) FROM (SELECT job_id FROM ledger_entries WHERE job_id IS NOT NULL "
                    "GROUP BY job_id HAVING count(*) <> 4) AS odd")
        odd = cur.fetchone()[0]
        pg.close()
        result["counts_final"] = final
        if final["settled"] != final.get("done", 0) or odd:
            problems.append(f"ledger: {final['settled']} settled for {final.get('done', 0)} done jobs, "
                            f"{odd} jobs without exactly 4 entries")
        engine = make_sync_engine(stack.database_url)
        try:
            with engine.connect() as conn:
                drift = reconcile(conn)
        finally:
            engine.dispose()
        if drift:
            problems.append(f"reconcile: {drift[:3]}")
        for process in (api, ledger):
            if "Traceback" in process.log():
                problems.append(f"{process.name} logged a traceback: {process.log()[-1500:]}")
        return result
    finally:
        if fleet is not None:
            fleet.stop()
        for process in (ledger, api):
            if process is not None:
                process.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = c.Report("simulation")
    c.print_machine(report.machine)
    print(f"{args.workers} workers x {args.models_per_worker} of {args.models} models, {args.jobs} jobs queued, "
          f"generation {args.generate_seconds} s; load {args.submit_rate} submits/s + {args.status_rate} status "
          f"calls/s for {args.duration} s; {args.api_workers} API worker(s); aging "
          f"{f'every {args.aging_seconds:g} s' if args.aging_seconds > 0 else 'off'}", flush=True)
    result = run(args)
    report.runs.append(result)
    report.problems = result["problems"]
    if "latency" in result:
        print("\nAPI latency under load (ms):")
        print("| call | calls | failed | p50 | p90 | p99 | max |")
        print("|---|---|---|---|---|---|---|")
        for kind, s in result["latency"].items():
            print(f"| {kind} | {s['calls']} | {s['failed']} | {s.get('p50_ms', '-')} | {s.get('p90_ms', '-')} | "
                  f"{s.get('p99_ms', '-')} | {s.get('max_ms', '-')} |")
        w = result["ask_wait"]
        print(f"a free worker's ask -> its offer (ms), {w['offers']} offers in the window: p50 {w.get('p50_ms', '-')}, "
              f"p90 {w.get('p90_ms', '-')}, p99 {w.get('p99_ms', '-')}, max {w.get('max_ms', '-')}")
        m, peak = result["memory_after"], result["memory_peak"]
        print("\nmemory (MiB, RSS at the end of the window; peak of the 5 s samples):")
        print(f"- API: {m['api_total_mib']} in all (peak {peak['api_total_mib']}): per process {m['api_mib']}")
        print(f"- ledger: {m['ledger_mib']} (peak {peak['ledger_mib']})")
        print(f"- RabbitMQ: {m['rabbitmq']} (peak RSS {peak['rabbitmq_rss_mib']}); this vhost's queues: "
              f"{m['rabbitmq_vhost']}")
        print(f"- PostgreSQL (PSS, all its processes): {m['postgres_pss_mib']}")
        print(f"- the fake workers' process: {m['fake_workers_mib']}")
        print(f"\njobs done during the window: {result['done_per_s']}/s; counts before {result['counts_before']}, "
              f"after {result['counts_after']}; /metrics scrape {result['metrics_scrape_ms']} ms; "
              f"CPU api/ledger/fleet/pg/rmq/bench "
              f"{c.fmt_cpu(result['cpu'], ('api', 'ledger', 'fleet', 'pg', 'rmq', 'bench'))} other "
              f"{result['cpu']['other']:.0f}")
    if report.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(report.problems))
    else:
        print("verified: no API call failed; every done job settled exactly once; reconcile clean")
    report.save(args.json)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
