#!/usr/bin/env python
"""Ledger throughput: job.done settlements per second by ``horde ledger``, and exactly-once.

Each run: a fresh database (migrated, with requester and worker-owner users) and vhost (the
topology declared with ``declare_sync(build_topology(...))``); K valid ``job-done.v1`` events are
published into ``horde.ledger`` through ``horde.events`` (routing key ``job.done``, persistent,
confirmed, ``user_id`` guest, which is a trusted AMQP user by default), spread over the accounts.
Only then is ``horde ledger`` started with HORDE_LEDGER_PREFETCH=p. The clock runs from the
consumer logging "ledger consumer ready" to ``ledger_entries`` holding every leg of the K
settlements (polled every 50 ms), so process start-up is excluded (it is reported apart). The
expected legs and balances come from ``ledger.book.job_posting`` itself (debit and credit, plus
the horde-tax legs since the economy change: 4 entries per job), so the check follows the rules.

Checks after the run (ledger stopped): ledger_entries == the legs of the K postings,
ledger_inbox == K, every balance (users and BURN) equals what the published events imply,
``ledger.report.reconcile`` finds no drift, and ``horde.ledger`` and ``horde.dead`` are empty.
``--duplicates F`` republishes a fraction F of the events a second time (same message_id) in
among the others, which must change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone

try:
    from bench import _common as c
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]


from broker.messages import JobDone  # noqa: E402
from broker.topology import DEAD_QUEUE, EVENTS_EXCHANGE, JOB_DONE_KEY, LEDGER_QUEUE, build_topology  # noqa: E402

PEPPER = "bench-pepper"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Settlements per second of `horde ledger` over a backlog of job.done events, exactly once.",
        epilog="example: python bench/ledger.py --events 20000 --prefetch 100 500 --runs 3 --json /tmp/ledger.json",
    )
    p.add_argument("--events", "-k", type=int, default=20_000, help="job.done events per run (default 20000)")
    p.add_argument("--prefetch", type=int, nargs="+", default=[100, 500],
                   help="HORDE_LEDGER_PREFETCH values (default: 100 500)")
    p.add_argument("--runs", type=int, default=3, help="runs per prefetch value (default 3)")
    p.add_argument("--requesters", type=int, default=200, help="distinct requester accounts (default 200)")
    p.add_argument("--owners", type=int, default=20, help="distinct worker-owner accounts (default 20)")
    p.add_argument("--duplicates", type=float, default=0.0,
                   help="fraction of events also published a second time, same message_id (default 0)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up a run after this many seconds (default 300)")
    p.add_argument("--seed", type=int, default=1, help="random seed for the accounts and amounts (default 1)")
    c.add_noise_arguments(p)
    p.add_argument("--json", help="write all results as JSON to this file")
    args = p.parse_args(argv)
    args.max_attempts = args.max_attempts or 4 * args.runs * len(args.prefetch)
    if not 1 <= args.events <= 500_000 or not 1 <= args.runs <= 20 or not 0 <= args.duplicates <= 1:
        p.error("keep --events in 1..500000, --runs in 1..20, --duplicates in 0..1")
    if not 1 <= args.timeout <= 3600:
        p.error("--timeout in 1..3600")
    return args


def make_users(database_url: str, requesters: int, owners: int) -> tuple[list[int], list[int]]:
    from api.accounts import create_user
    from config.database import make_sync_engine

    engine = make_sync_engine(database_url)
    try:
        with engine.begin() as conn:
            req = [create_user(conn, f"requester-{i}", pepper=PEPPER)[0].id for i in range(requesters)]
            own = [create_user(conn, f"owner-{i}", pepper=PEPPER)[0].id for i in range(owners)]
    finally:
        engine.dispose()
    return [0, *req], own  # the anonymous account pays for jobs too


def make_events(k: int, requesters: list[int], owners: list[int], rng: random.Random) -> list[tuple[str, JobDone]]:
    now = datetime.now(timezone.utc)
    events = []
    for _ in range(k):
        job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        owner = rng.choice(owners)
        done = JobDone(
            job_id=job_id, request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            requester_id=rng.choice(requesters), worker_id=1 + owners.index(owner), worker_owner_id=owner,
            worker_name=f"bench-worker-{owner}", model="tiny-sd", kind="image",
            kudos=round(rng.uniform(1, 30), 2), megapixelsteps=0.06, finished_at=now,
        )
        events.append((f"job-done:{job_id}", done))
    return events


async def publish(amqp_url: str, events: list[tuple[str, JobDone]], chunk: int = 1000) -> float:
    """Confirmed, persistent publishes as a trusted service does them; returns seconds taken."""
    from broker.amqp import Publisher, amqp_user, connect

    connection = await connect(amqp_url, name="bench-ledger-publisher")
    start = time.monotonic()
    try:
        publisher = await Publisher.open(connection, user_id=amqp_user(amqp_url))
        for i in range(0, len(events), chunk):
            await asyncio.gather(*(publisher.publish(EVENTS_EXCHANGE, JOB_DONE_KEY, done, message_id=message_id)
                                   for message_id, done in events[i:i + chunk]))
    finally:
        await connection.close()
    return time.monotonic() - start


def declare(amqp_url: str) -> None:
    from broker.amqp import connect_sync, declare_sync
    from config import load_model_reference

    connection = connect_sync(amqp_url, name="bench-ledger-declare")
    try:
        declare_sync(connection.channel(), build_topology(load_model_reference(None).names()))
    finally:
        connection.close()


def one_run(prefetch: int, args: argparse.Namespace, label: str, seed: int) -> dict:
    import psycopg2

    from config.database import make_sync_engine
    from ledger.book import balances, job_posting
    from ledger.report import reconcile
    from ledger.units import to_units

    background = c.wait_quiet(args.max_background, args.wait_quiet)
    load_before = c.loadavg()
    stack = c.Stack.create()
    ledger = None
    try:
        rng = random.Random(seed)
        requesters, owners = make_users(stack.database_url, args.requesters, args.owners)
        events = make_events(args.events, requesters, owners, rng)
        # What the ledger must end with, from the book's own rule (price, horde tax, ...).
        expected: dict[int, int] = defaultdict(int)
        target = 0
        for _, done in events:
            posting = job_posting(done)
            if posting is not None:
                target += len(posting.legs)
                for leg in posting.legs:
                    expected[leg.account_id] += leg.amount
        keyed = [(float(i), event) for i, event in enumerate(events)]
        dupes = rng.sample(range(len(events)), int(len(events) * args.duplicates))
        keyed += [(rng.uniform(i + 0.5, len(events)), events[i]) for i in dupes]  # a copy after the first
        to_publish = [event for _, event in sorted(keyed, key=lambda pair: pair[0])]
        declare(stack.rabbitmq_url)
        publish_s = asyncio.run(publish(stack.rabbitmq_url, to_publish))
        queued, _ = c.queue_depth(stack.rabbitmq_url, LEDGER_QUEUE)
        if queued != len(to_publish):
            raise RuntimeError(f"{LEDGER_QUEUE} holds {queued} messages, {len(to_publish)} were published")

        pg = psycopg2.connect(stack.database_url)
        pg.autocommit = True
        cur = pg.cursor()

        def entries() -> int:
            cur.execute("SELECT count(*) FROM ledger_entries")
            return cur.fetchone()[0]

        spawned = time.monotonic()
        ledger = c.HordeProcess("ledger", ["ledger"],
                                stack.env(ledger_prefetch=prefetch, log_level="INFO"), stack.state_dir)
        ledger.wait_for(lambda: "ledger consumer ready" in ledger.log(), 60, "the ledger to start", poll=0.005)
        ready = time.monotonic()
        window = c.CpuWindow({"ledger": ledger.pid}, singles={"bench": os.getpid()}).start()
        deadline = ready + args.timeout
        count = 0
        while time.monotonic() < deadline and ledger.alive():
            count = entries()
            if count >= target:
                break
            time.sleep(0.05)
        finished = time.monotonic()
        cpu = window.stop()
        load_after = c.loadavg()
        ledger_rc = ledger.stop()
        ledger_log = ledger.log()
        ledger = None

        # --- verification ---
        problems = []
        count = entries()
        # Each transaction stamps its rows with one ``now``: distinct stamps = transactions.
        cur.execute("SELECT count(*), count(DISTINCT received_at) FROM ledger_inbox")
        inbox, transactions = cur.fetchone()
        pg.close()
        if count != target:
            problems.append(f"ledger_entries holds {count} rows, expected {target}")
        if inbox != len(events):
            problems.append(f"ledger_inbox holds {inbox} rows, expected {len(events)}")
        engine = make_sync_engine(stack.database_url)
        try:
            with engine.connect() as conn:
                drift = reconcile(conn)
                have = {a: to_units(b) for a, b in balances(conn).items() if b}
        finally:
            engine.dispose()
        if drift:
            problems.append(f"reconcile: {drift[:3]}")
        want = {a: u for a, u in expected.items() if u}
        if have != want:
            wrong = sorted(a for a in have.keys() | want.keys() if have.get(a) != want.get(a))
            problems.append(f"{len(wrong)} balances differ from the events' sums (e.g. account {wrong[0]})")
        left, _ = c.queue_depth(stack.rabbitmq_url, LEDGER_QUEUE)
        dead, _ = c.queue_depth(stack.rabbitmq_url, DEAD_QUEUE)
        if left or dead:
            problems.append(f"{left} messages left in {LEDGER_QUEUE}, {dead} in {DEAD_QUEUE}")
        if ledger_rc != 0:
            problems.append(f"horde ledger exited with {ledger_rc}")
        if " ERROR " in ledger_log or "Traceback" in ledger_log:
            problems.append("the ledger logged errors")
        seconds = finished - ready
        run = {
            "prefetch": prefetch, "label": label, "events": len(events), "duplicates": len(dupes),
            "seconds": round(seconds, 3), "settlements_s": round(len(events) / seconds, 1),
            "deliveries_s": round(len(to_publish) / seconds, 1), "startup_s": round(ready - spawned, 2),
            "publish_s": round(publish_s, 2), "entries_expected": target, "entries": count,
            "transactions": transactions, "mean_batch": round(inbox / max(1, transactions), 1), "inbox": inbox,
            "reconcile_drift": drift,
            "cpu": cpu, "clean": cpu["other"] <= args.max_other, "background_busy_before": background,
            "loadavg_before": load_before, "loadavg_after": load_after, "problems": problems,
        }
        if problems:
            run["ledger_log_tail"] = ledger_log[-2000:]
        return run
    finally:
        if ledger is not None:
            ledger.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = c.Report("ledger")
    c.print_machine(report.machine)
    print(f"{args.events} job.done events per run (+{args.duplicates:.0%} duplicates), {args.requesters}+1 "
          f"requesters, {args.owners} worker owners; prefetch {args.prefetch}")
    order = ("ledger", "pg", "rmq", "bench")

    def one(prefetch: int, attempt: int) -> dict:
        label = f"p{prefetch}-a{attempt}"
        run = one_run(prefetch, args, label, seed=args.seed + attempt)
        print(f"{label}: {run['settlements_s']:,.0f} settlements/s ({run['events']} in {run['seconds']} s; "
              f"start-up {run['startup_s']} s); {run['transactions']} transactions, mean batch {run['mean_batch']}; "
              f"entries {run['entries']}, inbox {run['inbox']}, "
              f"reconcile {'clean' if not run['reconcile_drift'] else 'DRIFT'}; "
              f"CPU ledger/pg/rmq/bench {c.fmt_cpu(run['cpu'], order)} other {run['cpu']['other']:.0f} "
              f"({'clean' if run['clean'] else 'DISTURBED'}); load {run['loadavg_before']}"
              + (f"; PROBLEMS: {run['problems']}" if run["problems"] else ""), flush=True)
        report.problems += [f"{label}: {p}" for p in run["problems"]]
        return run

    report.runs = c.interleaved(args.prefetch, args.runs, args.max_attempts, one)
    print("\nmedians (clean runs):")
    print("| prefetch | settlements/s | seconds | mean batch | CPU ledger/pg/rmq/bench · busy | runs (settlements/s) "
          "| used |")
    print("|---|---|---|---|---|---|---|")
    for prefetch in args.prefetch:
        runs, used = c.usable([r for r in report.runs if r["prefetch"] == prefetch])
        cpu = {k: c.median(r["cpu"][k] for r in runs) for k in (*order, "busy", "other")}
        row = {"prefetch": prefetch, "settlements_s": c.median(r["settlements_s"] for r in runs),
               "seconds": c.median(r["seconds"] for r in runs), "mean_batch": c.median(r["mean_batch"] for r in runs),
               "cpu": cpu, "runs": [r["settlements_s"] for r in runs], "used": used}
        report.summary.append(row)
        print(f"| {prefetch} | {row['settlements_s']:,.0f} | {row['seconds']:.2f} | {row['mean_batch']} | "
              f"{c.fmt_cpu(cpu, order)} | {', '.join(f'{x:,.0f}' for x in row['runs'])} | {used} |")
    if report.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(report.problems))
    report.save(args.json)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
