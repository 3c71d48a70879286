"""The admin reports' queries (ledger.report): filters, paging, summaries against sums worked out by
hand, CSV. On real PostgreSQL (a database of this module's own) and on SQLite.

``build_scenario`` posts a small, fully known history through the ledger's own functions;
``expected_summary`` is what each ``group_by`` must answer for it. The API tests reuse both.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Connection, Engine

from broker.messages import JobDone
from config.database import make_sync_engine
from ledger import book, report
from ledger.book import Leg, Posting
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT
from tests import services

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Cast:
    """Who takes part: three users and three workers (bob owns 7 and 8, carol owns 9)."""

    alice: int
    bob: int
    carol: int
    w7: int
    w8: int
    w9: int


def _job(conn: Connection, cast: Cast, requester: int, owner: int, worker: int, model: str, kudos: float, at: datetime,
         *, mps: float = 0.0, tokens: int = 0) -> None:
    job_id = str(uuid.uuid4())
    done = JobDone(job_id=job_id, request_id=job_id, requester_id=requester, worker_id=worker, worker_owner_id=owner,
                   worker_name=f"w{worker}", model=model, kind="text" if tokens else "image", kudos=kudos,
                   megapixelsteps=mps, tokens=tokens, finished_at=at)
    assert book.settle_job(conn, done, at)


def build_scenario(conn: Connection, cast: Cast, t0: datetime = T0) -> None:
    """Three days of movements. Taxes are 5%: 0.50, 1.00, 0.25 and 0.20."""
    c, group = cast, uuid.uuid4().hex
    book.grant(conn, c.alice, 100, reason="welcome", now=t0)
    _job(conn, c, c.alice, c.bob, c.w7, "m1", 10, t0 + timedelta(hours=1), mps=1.5)  # day 1
    _job(conn, c, c.alice, c.bob, c.w8, "m2", 20, t0 + DAY, mps=3.0)  # day 2
    _job(conn, c, c.carol, c.carol, c.w9, "m1", 5, t0 + DAY + timedelta(hours=2), mps=2.0)  # day 2, self-served
    _job(conn, c, c.alice, c.carol, c.w9, "t1", 4, t0 + 2 * DAY, tokens=300)  # day 3
    uptime = Posting((Leg(MINT_ACCOUNT, -5000, f"uptime:{group}:mint"), Leg(c.bob, 5000, f"uptime:{group}:credit")),
                     "uptime", worker_id=c.w7, memo="uptime")
    book.post_many(conn, [uptime], now=t0 + 2 * DAY)
    book.transfer(conn, c.alice, c.carol, 7, memo="thanks", now=t0 + 2 * DAY + timedelta(hours=1))
    book.post(conn, [Leg(c.carol, -300, f"revoke:{group}:user"), Leg(BURN_ACCOUNT, 300, f"revoke:{group}:burn")],
              kind="admin", memo="abuse", now=t0 + 2 * DAY + timedelta(hours=2))


def expected_summary(cast: Cast, t0: datetime = T0) -> dict[str, dict[object, tuple[int, int, int, float, int]]]:
    """group_by -> key -> (earned, spent, jobs, megapixelsteps, tokens), kudos in hundredths."""
    d1, d2, d3 = (str((t0 + i * DAY).date()) for i in range(3))
    c = cast
    return {
        "day": {d1: (1000, 1050, 1, 1.5, 0), d2: (2500, 2625, 2, 5.0, 0), d3: (5400, 420, 1, 0.0, 300)},
        "user": {c.alice: (0, 3570, 3, 4.5, 300), c.bob: (8000, 0, 2, 4.5, 0), c.carol: (900, 525, 2, 2.0, 300)},
        "worker": {c.w7: (6000, 1050, 1, 1.5, 0), c.w8: (2000, 2100, 1, 3.0, 0), c.w9: (900, 945, 2, 2.0, 300)},
        "model": {"m1": (1500, 1575, 2, 3.5, 0), "m2": (2000, 2100, 1, 3.0, 0), "t1": (400, 420, 1, 0.0, 300)},
    }


# --- fixtures --------------------------------------------------------------------------------------

CAST = Cast(alice=11, bob=12, carol=13, w7=7, w8=8, w9=9)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with services.migrated_database(request.param, tmp_path_factory.mktemp("reports"),
                                    prefix="horde_reports_test") as url:
        engine = make_sync_engine(url)
        with engine.begin() as conn:
            build_scenario(conn, CAST)
        yield engine
        engine.dispose()


@pytest.fixture
def conn(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        yield connection


def _sums(rows: list[report.SummaryRow]) -> dict[object, tuple[int, int, int, float, int]]:
    return {r.key: (r.earned, r.spent, r.jobs, round(r.megapixelsteps, 6), r.tokens) for r in rows}


# --- summary ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_by", report.GROUPS)
def test_summary_matches_the_sums_worked_out_by_hand(conn: Connection, group_by: str) -> None:
    assert _sums(report.summary(conn, group_by)) == expected_summary(CAST)[group_by]


def test_summary_keeps_the_time_range_since_inclusive_until_exclusive(conn: Connection) -> None:
    expected = expected_summary(CAST)["day"]
    day2 = datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert list(_sums(report.summary(conn, "day", since=day2))) == ["2026-03-02", "2026-03-03"]
    assert _sums(report.summary(conn, "day", until=day2)) == {"2026-03-01": expected["2026-03-01"]}
    naive = datetime(2026, 3, 2, 0, 0)  # taken as UTC
    assert _sums(report.summary(conn, "day", since=naive, until=naive + DAY)) == {"2026-03-02": expected["2026-03-02"]}
    # A self-served job (carol requested it, her worker served it) counts once for her.
    assert _sums(report.summary(conn, "user", since=day2, until=day2 + DAY))[CAST.carol] == (500, 525, 1, 2.0, 0)


def test_summary_sorts_by_a_sum_and_keeps_the_top(conn: Connection) -> None:
    assert [r.key for r in report.summary(conn, "user", sort="earned")] == [CAST.bob, CAST.carol, CAST.alice]
    assert [r.key for r in report.summary(conn, "user", sort="spent", limit=1)] == [CAST.alice]
    assert [r.key for r in report.summary(conn, "model", sort="jobs", limit=2)] == ["m1", "m2"]  # ties by key
    with pytest.raises(ValueError):
        report.summary(conn, "week")


# --- entries ---------------------------------------------------------------------------------------


def _all(conn: Connection, where: report.EntryFilter) -> list[report.Entry]:
    page = report.entries_page(conn, where, per_page=1000)
    assert not page.has_more
    return page.entries


def test_entries_are_filtered_by_account_worker_model_kind_and_time(conn: Connection) -> None:
    everything = _all(conn, report.EntryFilter())
    assert len(everything) == 2 + 4 * 4 + 2 + 2 + 2
    cases = {
        report.EntryFilter(account_id=CAST.alice): lambda e: e.account_id == CAST.alice,
        report.EntryFilter(account_id=BURN_ACCOUNT): lambda e: e.account_id == BURN_ACCOUNT,
        report.EntryFilter(worker_id=CAST.w9): lambda e: e.worker_id == CAST.w9,
        report.EntryFilter(model="m1"): lambda e: e.model == "m1",
        report.EntryFilter(kind="admin"): lambda e: e.kind == "admin",
        report.EntryFilter(account_id=CAST.carol, kind="generation"):
            lambda e: e.account_id == CAST.carol and e.kind == "generation",
        report.EntryFilter(since=T0 + DAY, until=T0 + 2 * DAY): lambda e: T0 + DAY <= e.created_at < T0 + 2 * DAY,
    }
    for where, wanted in cases.items():
        found = _all(conn, where)
        assert found == [e for e in everything if wanted(e)], where
        assert found, where
    assert len(_all(conn, report.EntryFilter(account_id=CAST.alice))) == 1 + 2 + 2 + 2 + 1
    assert len(_all(conn, report.EntryFilter(kind="tax"))) == 8
    assert _all(conn, report.EntryFilter(model="nothing")) == []


def test_entries_are_newest_first_with_ties_broken_by_id(conn: Connection) -> None:
    everything = _all(conn, report.EntryFilter())
    assert [(e.created_at, e.id) for e in everything] == sorted(((e.created_at, e.id) for e in everything),
                                                                reverse=True)
    assert all(e.created_at.tzinfo is not None for e in everything)


@pytest.mark.parametrize("per_page", [1, 3, 7])
def test_pages_cover_every_entry_once_in_order(conn: Connection, per_page: int) -> None:
    everything = _all(conn, report.EntryFilter())
    seen, page = [], 1
    while True:
        got = report.entries_page(conn, report.EntryFilter(), page=page, per_page=per_page)
        seen += got.entries
        assert len(got.entries) == per_page or not got.has_more
        if not got.has_more:
            break
        page += 1
    assert seen == everything
    assert report.entries_page(conn, report.EntryFilter(), page=page + 1, per_page=per_page).entries == []
    with pytest.raises(ValueError):
        report.entries_page(conn, report.EntryFilter(), per_page=report.MAX_PER_PAGE + 1)


def test_the_scenario_reconciles(conn: Connection) -> None:
    assert report.reconcile(conn) == []


# --- records and CSV -------------------------------------------------------------------------------


def test_csv_has_a_header_row_and_the_records_values(conn: Connection) -> None:
    names = {CAST.alice: "alice#11"}
    records = [report.entry_record(e, names, {CAST.w9: "gpu-nine"}) for e in _all(conn, report.EntryFilter())]
    rows = list(csv.DictReader(io.StringIO(report.to_csv(report.ENTRY_FIELDS, records))))
    assert len(rows) == len(records) and list(rows[0]) == list(report.ENTRY_FIELDS)
    for row, record in zip(rows, records, strict=True):
        assert float(row["amount"]) == record["amount"]
        assert row["account"] == record["account"] and row["memo"] == record["memo"] and row["key"] == record["key"]
        assert row["worker"] == (record["worker"] or "") and row["time"] == record["time"]
    assert {r["account"] for r in rows} >= {"alice#11", "MINT", "BURN", str(CAST.bob)}
    assert "gpu-nine" in {r["worker"] for r in rows}

    summary = [report.summary_record(r, "user", names) for r in report.summary(conn, "user")]
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(report.SUMMARY_FIELDS, summary))))
    assert [(r["group"], r["id"], r["earned"], r["spent"], r["jobs"]) for r in parsed] == [
        ("alice#11", "11", "0.00", "35.70", "3"), (f"#{CAST.bob}", "12", "80.00", "0.00", "2"),
        (f"#{CAST.carol}", "13", "9.00", "5.25", "2")]
