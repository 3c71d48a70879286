#!/usr/bin/env python
"""Accept-path throughput: accepted image submissions per second against a real ``horde api``.

Each run: a fresh PostgreSQL database (migrated) and RabbitMQ vhost, ``horde api`` started as a
subprocess with HORDE_API_WORKERS=w on a free port, a wrk warm-up, then the measured wrk run
(N connections POSTing a small valid image request as the anonymous user). Then the API is
stopped (it finishes what is in flight) and the run is verified:

- every 202 that wrk received names a request whose job row is committed;
- the model queue holds exactly one message per job row, and (drained) their message ids are
  exactly the job ids (counted once the API has stopped: see ``one_run``);
- rows without a 202 are only the requests wrk abandoned in flight when its clock ran out
  (at most the connection count per wrk invocation).

Runs of the different worker counts are interleaved, so slow drifts of the machine's background
load hit all of them alike. CPU is read from /proc over the measured window (see bench/_common.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from bench import _common as c
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]

from broker.topology import job_queue  # noqa: E402  (after _common has put the repo on the path)

BODY = '{"prompt":"a cat","models":["tiny-sd"],"params":{"width":64,"height":64,"steps":4}}'
MODEL = "tiny-sd"

LUA = r"""
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["apikey"] = "%(apikey)s"

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  out = io.open(args[1] .. "-" .. tid .. ".txt", "w")
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 202 then out:write(body, "\n") end
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then for k, v in pairs(s) do agg[k] = (agg[k] or 0) + v end end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, string.format('"%%d":%%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,' ..
    '"timeout":%%d,"mean_us":%%.1f,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,"statuses":{%%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(parts, ",")))
end
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Accepted submissions per second against a real `horde api` (wrk; medians of runs).",
        epilog="example: python bench/accept.py --workers 1 2 --runs 3 --json /tmp/accept.json",
    )
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="HORDE_API_WORKERS values (default: 1 2)")
    p.add_argument("--runs", type=int, default=3, help="runs per worker count (default 3)")
    p.add_argument("--connections", "-c", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--threads", "-t", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--duration", "-d", type=int, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds before each run (default 3)")
    p.add_argument("--apikey", default="0000000000", help="apikey header (default: the anonymous key)")
    p.add_argument("--no-drain", action="store_true", help="skip draining the queue to compare message ids")
    c.add_noise_arguments(p)
    p.add_argument("--json", help="write all results as JSON to this file")
    args = p.parse_args(argv)
    args.max_attempts = args.max_attempts or 4 * args.runs * len(args.workers)
    if not 1 <= args.duration <= 120 or not 0 <= args.warmup <= 60 or not 1 <= args.runs <= 20:
        p.error("keep --duration in 1..120, --warmup in 0..60 and --runs in 1..20")
    if not 1 <= args.connections <= 1024 or not 1 <= args.threads <= args.connections:
        p.error("--connections in 1..1024, --threads in 1..connections")
    return args


def wrk(url: str, script: Path, out_prefix: Path, *, threads: int, connections: int, seconds: int,
        cpu_groups: dict[str, int] | None = None) -> tuple[dict, dict | None]:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency",
           "-s", str(script), url, "--", str(out_prefix)]
    window = c.CpuWindow(cpu_groups) if cpu_groups is not None else None
    children = c.ChildrenCpu()
    if window:
        window.start()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=seconds + 60)
    cpu = window.stop(extra={"wrk": children.used()}) if window else None
    if window and cpu is not None:
        cpu = {**cpu, "api_processes": window.per_process.get("api", {})}
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return json.loads(line[len("WRKJSON "):]), cpu


def accepted_ids(out_prefix: Path, threads: int) -> list[str]:
    ids = []
    for tid in range(1, threads + 1):
        path = Path(f"{out_prefix}-{tid}.txt")
        if path.exists():
            ids += [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    return ids


def drain(amqp_url: str, queue: str, expected: int, timeout: float = 120) -> list[str]:
    """Consume (auto-ack) every message of ``queue``; their message ids."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ids: list[str] = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=2000)
        channel.basic_consume(queue, lambda _ch, _m, props, _b: ids.append(props.message_id), auto_ack=True)
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            before = len(ids)
            connection.process_data_events(time_limit=0.2)
            if len(ids) != before:
                quiet_since = time.monotonic()
            elif len(ids) >= expected and time.monotonic() - quiet_since > 0.5:
                break
    finally:
        connection.close()
    return ids


def one_run(workers: int, args: argparse.Namespace, scratch: Path, label: str) -> dict:
    import psycopg2

    background = c.wait_quiet(args.max_background, args.wait_quiet)
    load_before = c.loadavg()
    stack = c.Stack.create()
    api = None
    try:
        port = c.free_port()
        api = c.start_api(stack, port, workers=workers)
        url = f"http://127.0.0.1:{port}/api/v2/generate/async"
        script = scratch / "submit.lua"
        script.write_text(LUA % {"body": BODY, "apikey": args.apikey})
        warm_prefix, run_prefix = scratch / f"{label}-warm", scratch / f"{label}-run"
        if args.warmup:
            wrk(url, script, warm_prefix, threads=args.threads, connections=args.connections, seconds=args.warmup)
        result, cpu = wrk(url, script, run_prefix, threads=args.threads, connections=args.connections,
                          seconds=args.duration, cpu_groups={"api": api.pid})
        load_after = c.loadavg()
        time.sleep(0.5)
        api_rc = api.stop()  # graceful: requests in flight finish; no reconciler republishes during checks
        api_log_tail = api.log()[-2000:]
        api = None

        # --- verification ---
        run_ids = accepted_ids(run_prefix, args.threads)
        warm_ids = accepted_ids(warm_prefix, args.threads) if args.warmup else []
        accepted = set(run_ids) | set(warm_ids)
        conn = psycopg2.connect(stack.database_url)
        with conn.cursor() as cur:
            cur.execute("SELECT id, request_id, state FROM jobs")
            rows = cur.fetchall()
        conn.close()
        job_ids = {r[0] for r in rows}
        request_ids = {r[1] for r in rows}
        # The API's dispatcher takes messages out only for waiting workers (none here), but a
        # message it held unacked would return to the queue when stopping the API closed its
        # connection: once the queue has no consumer every message is ready, so the exact count and
        # the drain below still see each job's message, the held ones included, without reading
        # the management API's (lagging) counters.
        ready, consumers = c.wait_unheld(stack.rabbitmq_url, job_queue(MODEL))
        problems = []
        status = {int(k): v for k, v in result["statuses"].items()}
        n202 = status.get(202, 0)
        if n202 != len(run_ids):
            problems.append(f"wrk counted {n202} 202s but wrote {len(run_ids)} bodies")
        if len(accepted) != len(run_ids) + len(warm_ids):
            problems.append("a request id was answered twice")
        missing = accepted - request_ids
        if missing:
            problems.append(f"{len(missing)} accepted requests have no job row")
        abandoned = len(request_ids - accepted)
        if abandoned > args.connections * (2 if args.warmup else 1):
            problems.append(f"{abandoned} job rows without a 202: more than wrk can have abandoned in flight")
        if consumers:
            problems.append(f"the model queue still has {consumers} consumer(s) after the API stopped")
        if ready != len(rows):
            problems.append(f"queue holds {ready} messages for {len(rows)} job rows")
        # uvicorn's workers share one listening socket: wrk's burst of keep-alive connections
        # sometimes lands on fewer processes than there are, for the whole run. Not a fault of
        # the code under test, but such a run does not measure w workers: it is retried.
        serving = sum(1 for pct in cpu["api_processes"].values() if pct >= 10)
        imbalanced = serving < workers
        if any(r[2] != "queued" for r in rows):
            problems.append("some jobs are not 'queued'")
        drained = None
        if not args.no_drain:
            message_ids = drain(stack.rabbitmq_url, job_queue(MODEL), ready)
            drained = len(message_ids)
            if len(message_ids) != len(set(message_ids)) or set(message_ids) != job_ids:
                problems.append(f"queue message ids differ from job ids: {len(set(message_ids) - job_ids)} extra, "
                                f"{len(job_ids - set(message_ids))} missing, "
                                f"{len(message_ids) - len(set(message_ids))} duplicated")
        non2xx = sum(v for k, v in status.items() if not 200 <= k < 300)
        seconds = result["duration_us"] / 1e6
        run = {
            "workers": workers, "label": label, "requests": result["requests"], "seconds": round(seconds, 2),
            "req_s": round(result["requests"] / seconds, 1), "accepted_s": round(n202 / seconds, 1),
            "p50_ms": round(result["p50_us"] / 1000, 1), "p90_ms": round(result["p90_us"] / 1000, 1),
            "p99_ms": round(result["p99_us"] / 1000, 1), "max_ms": round(result["max_us"] / 1000, 1),
            "statuses": status, "non2xx": non2xx,
            "socket_errors": {k: result[k] for k in ("connect", "read", "write", "timeout")},
            "accepted_total": len(accepted), "job_rows": len(rows), "queue_messages": ready, "drained": drained,
            "abandoned_in_flight": abandoned, "cpu": cpu, "background_busy_before": background,
            "clean": cpu["other"] <= args.max_other and not imbalanced,
            "imbalanced": imbalanced,
            "loadavg_before": load_before, "loadavg_after": load_after, "api_exit": api_rc, "problems": problems,
        }
        if problems:
            run["api_log_tail"] = api_log_tail
        return run
    finally:
        if api is not None:
            api.stop()
        stack.close()


def verdict(run: dict) -> str:
    if run["imbalanced"]:
        return "IMBALANCED: fewer API processes busy than workers, retried"
    return "clean" if run["clean"] else "DISTURBED by other processes"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    report = c.Report("accept")
    c.print_machine(report.machine)
    print(f"load: {args.connections} connections, {args.threads} wrk threads, {args.duration} s "
          f"(+{args.warmup} s warm-up) per run, body {BODY}")
    order = ("api", "pg", "rmq", "wrk")
    with tempfile.TemporaryDirectory(prefix="horde-bench-accept-") as tmp:

        def one(w: int, attempt: int) -> dict:
            label = f"w{w}-a{attempt}"
            run = one_run(w, args, Path(tmp), label)
            print(f"{label}: {run['req_s']:.0f} req/s, accepted {run['accepted_s']:.0f}/s, p50 {run['p50_ms']} ms, "
                  f"p99 {run['p99_ms']} ms, non-2xx {run['non2xx']}, 202s total {run['accepted_total']} = rows "
                  f"{run['job_rows']} - {run['abandoned_in_flight']} abandoned; queue {run['queue_messages']}; "
                  f"CPU api/pg/rmq/wrk {c.fmt_cpu(run['cpu'], order)} other {run['cpu']['other']:.0f} "
                  f"({verdict(run)}); load {run['loadavg_before']}"
                  + (f"; PROBLEMS: {run['problems']}" if run["problems"] else ""), flush=True)
            report.problems += [f"{label}: {p}" for p in run["problems"]]
            return run

        report.runs = c.interleaved(args.workers, args.runs, args.max_attempts, one)
    print("\nmedians (clean runs):")
    print("| w | req/s | accepted/s | p50 ms | p99 ms | non-2xx | CPU api/pg/rmq/wrk · busy | runs (req/s) | used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in args.workers:
        runs, used = c.usable([r for r in report.runs if r["workers"] == w])
        cpu = {k: c.median(r["cpu"][k] for r in runs) for k in (*order, "busy", "other")}
        row = {
            "workers": w, "req_s": c.median(r["req_s"] for r in runs),
            "accepted_s": c.median(r["accepted_s"] for r in runs), "p50_ms": c.median(r["p50_ms"] for r in runs),
            "p99_ms": c.median(r["p99_ms"] for r in runs), "non2xx": sum(r["non2xx"] for r in runs), "cpu": cpu,
            "runs_req_s": [r["req_s"] for r in runs], "used": used,
        }
        report.summary.append(row)
        print(f"| {w} | {row['req_s']:,.0f} | {row['accepted_s']:,.0f} | {row['p50_ms']} | {row['p99_ms']} | "
              f"{row['non2xx']} | {c.fmt_cpu(cpu, order)} | {', '.join(f'{x:,.0f}' for x in row['runs_req_s'])} | "
              f"{used} |")
    if report.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(report.problems))
    report.save(args.json)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
