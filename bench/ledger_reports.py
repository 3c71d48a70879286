#!/usr/bin/env python
"""Admin report queries over a large ledger: the entries page and each summary, timed.

A fresh PostgreSQL database (migrated, dropped afterwards) is filled with N ledger entries by
``INSERT … SELECT generate_series`` in a few seconds, shaped like a busy horde's year: 96% are job
settlements (4 legs each: requester debit, owner credit, tax debit, tax to BURN) spread over
``--users`` users, ``--workers`` workers, ``--models`` models and ``--days`` days; the rest are
uptime rewards (MINT to an owner), admin grants and transfers, 2 legs each. Balances are derived
from the entries, then ``VACUUM ANALYZE``; ``ledger.report.reconcile`` must find no drift.

Each query is what ``GET /api/v2/admin/ledger/entries`` and ``…/summary`` run
(``ledger.report.entries_page`` and ``ledger.report.summary``, records built, names not looked
up), through psycopg2 as the CLI does. One warm-up, then ``--runs`` timed runs; medians reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta, timezone

try:
    from bench import _common as c
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]

from sqlalchemy import Connection, text  # noqa: E402

from config.database import make_sync_engine  # noqa: E402
from ledger import report  # noqa: E402

END = datetime(2026, 12, 1, tzinfo=timezone.utc)  # the synthetic year ends here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the admin ledger reports over a synthetic ledger of N entries in PostgreSQL.",
        epilog="example: python bench/ledger_reports.py --entries 1000000 --runs 7 --json /tmp/reports.json",
    )
    p.add_argument("--entries", "-n", type=int, default=1_000_000, help="ledger entries (default 1000000)")
    p.add_argument("--users", type=int, default=10_000, help="user accounts (default 10000)")
    p.add_argument("--workers", type=int, default=200, help="workers (default 200)")
    p.add_argument("--models", type=int, default=20, help="models (default 20)")
    p.add_argument("--days", type=int, default=365, help="days the entries span (default 365)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per query (default 7)")
    p.add_argument("--max-background", type=float, default=40.0,
                   help="before timing, wait until the machine's busy CPU (%% of one core) is at most this "
                        "(default 40); a busier start is flagged")
    p.add_argument("--wait-quiet", type=float, default=120.0, help="wait at most this many seconds (default 120)")
    p.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    p.add_argument("--json", help="write all results as JSON to this file")
    args = p.parse_args(argv)
    if not 1_000 <= args.entries <= 20_000_000 or not 1 <= args.runs <= 50:
        p.error("keep --entries in 1000..20000000 and --runs in 1..50")
    if min(args.users, args.workers, args.models, args.days) < 2:
        p.error("--users, --workers, --models and --days are at least 2")
    return args


def fill(conn: Connection, args: argparse.Namespace) -> dict[str, int]:
    """Users, workers, entries and balances, all generated inside PostgreSQL."""
    jobs = args.entries * 96 // 100 // 4
    pairs = (args.entries - 4 * jobs) // 2
    params = {"users": args.users, "workers": args.workers, "models": args.models, "days": args.days,
              "jobs": jobs, "pairs": pairs, "end": END}
    conn.execute(text("""
        INSERT INTO users (id, alias, roles, created_at)
        SELECT u, 'user-' || u, '', :end - interval '400 days' FROM generate_series(1, :users) u
        ON CONFLICT (id) DO NOTHING"""), params)
    conn.execute(text("SELECT setval(pg_get_serial_sequence('users', 'id'), :users)"), params)
    conn.execute(text("""
        INSERT INTO workers (id, name, owner_id, amqp_user, created_at)
        SELECT w, 'worker-' || w, 1 + (w * 37) % :users, 'guest', :end - interval '400 days'
        FROM generate_series(1, :workers) w"""), params)
    # One job every (days*86400/jobs) seconds; requester, worker and model spread by multiplicative hashing.
    conn.execute(text("""
        INSERT INTO ledger_entries (key, account_id, amount, kind, job_id, worker_id, model, memo,
                                    megapixelsteps, tokens, created_at)
        SELECT 'job:' || j || ':' || leg.name,
               CASE WHEN leg.name = 'credit' THEN 1 + (w * 37) % :users
                    WHEN leg.name = 'tax' THEN -2 ELSE 1 + (j * 7919) % :users END,
               CASE leg.name WHEN 'debit' THEN -price WHEN 'credit' THEN price
                             WHEN 'tax-debit' THEN -tax ELSE tax END,
               CASE WHEN leg.name IN ('debit', 'credit') THEN 'generation' ELSE 'tax' END,
               'job-' || j, w, 'model-' || m, 'image by worker-' || w,
               CASE WHEN leg.name IN ('debit', 'credit') THEN mps ELSE 0 END, 0, at
        FROM (SELECT j, 1 + (j * 104729) % :workers AS w, 1 + (j * 15485863) % :models AS m,
                     10 + (j * 31) % 2000 AS price, greatest(1, (10 + (j * 31) % 2000) / 20) AS tax,
                     ((j * 31) % 2000) / 100.0 AS mps,
                     :end - (:days * interval '1 day') * (1 - j::float8 / :jobs) AS at
              FROM generate_series(1::bigint, :jobs) j) job
        CROSS JOIN (VALUES ('debit'), ('credit'), ('tax-debit'), ('tax')) AS leg(name)"""), params)
    # The other movements: uptime rewards, admin grants, transfers (two legs each).
    conn.execute(text("""
        INSERT INTO ledger_entries (key, account_id, amount, kind, worker_id, memo, created_at)
        SELECT kind || ':' || p || ':' || leg.name,
               CASE WHEN leg.side = 1 THEN 1 + (p * 7907) % :users
                    WHEN kind = 'transfer' THEN 1 + (p * 7919) % :users ELSE -1 END,
               leg.side * (100 + p % 5000), kind,
               CASE WHEN kind = 'uptime' THEN 1 + p % :workers END, kind || ' ' || p,
               :end - (:days * interval '1 day') * (1 - p::float8 / :pairs)
        FROM (SELECT p, (ARRAY['uptime', 'uptime', 'admin', 'transfer'])[1 + p % 4] AS kind
              FROM generate_series(1::bigint, :pairs) p) m
        CROSS JOIN (VALUES ('credit', 1), ('debit', -1)) AS leg(name, side)"""), params)
    conn.execute(text("""
        INSERT INTO balances (account_id, balance, updated_at)
        SELECT account_id, sum(amount), :end FROM ledger_entries GROUP BY account_id"""), params)
    return {"jobs": jobs, "other_postings": pairs}


def queries(args: argparse.Namespace) -> dict[str, object]:
    """Name → a callable(conn) running one report as the API would."""
    requester = 1 + (1 * 7919) % args.users  # requests about jobs/users jobs
    owner = 1 + (1 * 37) % args.users  # owns worker 1: about jobs/workers credits, plus uptime
    month = END - timedelta(days=30)

    def entries(where: report.EntryFilter, page: int = 1, per_page: int = 100):  # type: ignore[no-untyped-def]
        def run(conn: Connection) -> int:
            got = report.entries_page(conn, where, page=page, per_page=per_page)
            return len([report.entry_record(e, {}, {}) for e in got.entries])
        return run

    def summary(group_by: str, **kw: object):  # type: ignore[no-untyped-def]
        def run(conn: Connection) -> int:
            rows = report.summary(conn, group_by, **kw)  # type: ignore[arg-type]
            return len([report.summary_record(r, group_by, {}) for r in rows])
        return run

    return {
        "entries: newest 100": entries(report.EntryFilter()),
        "entries: one requester, 100": entries(report.EntryFilter(account_id=requester)),
        "entries: one worker owner, 100": entries(report.EntryFilter(account_id=owner)),
        "entries: one owner since 30 days, 100": entries(report.EntryFilter(account_id=owner, since=month)),
        "entries: one worker, 100": entries(report.EntryFilter(worker_id=7)),
        "entries: a worker with no entries (worst case)": entries(report.EntryFilter(worker_id=args.workers + 1)),
        "entries: one model, 100": entries(report.EntryFilter(model="model-3")),
        "entries: a model with no entries (worst case)": entries(report.EntryFilter(model="no-such-model")),
        "entries: kind admin, 100": entries(report.EntryFilter(kind="admin")),
        "entries: one day, 1000": entries(report.EntryFilter(since=END - timedelta(days=100),
                                                             until=END - timedelta(days=99)), per_page=1000),
        "entries: page 100 of 1000": entries(report.EntryFilter(), page=100, per_page=1000),
        "summary by day, all": summary("day"),
        "summary by user, all": summary("user"),
        "summary by user, top 10 earners": summary("user", sort="earned", limit=10),
        "summary by worker, all": summary("worker"),
        "summary by model, all": summary("model"),
        "summary by day, last 30 days": summary("day", since=month),
        "summary by user, last 30 days, top 10": summary("user", since=month, sort="earned", limit=10),
    }


def timed(engine, run, runs: int) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    samples, n = [], 0
    for i in range(runs + 1):
        with engine.connect() as conn:
            t0 = time.perf_counter()
            n = run(conn)
            elapsed = (time.perf_counter() - t0) * 1000
        if i:  # the first is a warm-up
            samples.append(round(elapsed, 1))
    return samples, n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = c.Report("ledger_reports")
    c.print_machine(out.machine)
    url = c.create_database("horde_bench_reports")
    engine = make_sync_engine(url)
    try:
        c.migrate(url)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            shape = fill(conn, args)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            count = conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()
        build = time.perf_counter() - t0
        with engine.connect() as conn:
            drift = report.reconcile(conn)
        if drift:
            out.problems += drift
        print(f"{count:,} entries ({shape['jobs']:,} jobs, {shape['other_postings']:,} other postings) over "
              f"{args.days} days, {args.users:,} users, {args.workers} workers, {args.models} models; "
              f"built and analysed in {build:.1f} s; reconcile: {'clean' if not drift else drift}")
        busy = c.wait_quiet(args.max_background, args.wait_quiet)
        if busy > args.max_background:
            out.problems.append(f"noisy: the machine was {busy:.0f}% busy (of one core) before timing")
        print(f"background CPU before timing: {busy:.0f}% of one core; load {c.loadavg()}\n")
        print("| query | rows | median ms | min | max |")
        print("|---|---|---|---|---|")
        for name, run in queries(args).items():
            samples, n = timed(engine, run, args.runs)
            row = {"query": name, "rows": n, "median_ms": c.median(samples), "min_ms": min(samples),
                   "max_ms": max(samples), "samples_ms": samples}
            out.summary.append(row)
            print(f"| {name} | {n} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} |", flush=True)
        out.runs.append({"entries": count, "build_seconds": round(build, 1), **shape, "background_busy": busy})
    finally:
        engine.dispose()
        if args.keep:
            print(f"kept {url}")
        else:
            c.drop_database(url)
    if out.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(out.problems))
    out.save(args.json)
    return 1 if out.problems else 0


if __name__ == "__main__":
    sys.exit(main())
