"""``horde admin report entries|summary``: the admin reports as an operator reads them (tables, CSV),
against this session's PostgreSQL database. The history is posted in 2002 so time filters isolate it.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import pytest

from api.accounts import create_user, create_worker
from config import Settings
from config.database import make_sync_engine
from tests.processes import REPO, settings_env
from tests.test_admin_reports import Cast, build_scenario

T0 = datetime(2002, 3, 1, 10, 0, tzinfo=timezone.utc)
SPAN = ("--since", "2002-03-01", "--until", "2002-03-04T00:00:00Z")


def horde(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=settings_env(settings),
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cast(settings: Settings) -> dict[str, str]:
    """Three users and three workers with the scenario's history; their names by role."""
    tag = uuid.uuid4().hex[:6]
    engine = make_sync_engine(settings.resolved_database_url)
    with engine.begin() as conn:
        alice, bob, carol = (create_user(conn, f"{n}-{tag}", pepper=settings.apikey_pepper)[0]
                             for n in ("alice", "bob", "carol"))
        w7, w8, w9 = (create_worker(conn, f"cli{n}-{tag}", owner=owner, amqp_user="guest")
                      for n, owner in ((7, bob), (8, bob), (9, carol)))
        build_scenario(conn, Cast(alice.id, bob.id, carol.id, w7.id, w8.id, w9.id), T0)
    engine.dispose()
    return {"alice": alice.username, "bob": bob.username, "carol": carol.username, "w9": w9.name}


def test_entries_of_an_account_since_a_day_as_a_table(settings: Settings, cast: dict[str, str]) -> None:
    result = horde(settings, "admin", "report", "entries", "--account", cast["alice"], "--since", "2002-03-02",
                   "--until", "2002-03-04")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Ledger entries, page 1 (50 per page), since 2002-03-02")
    assert re.match(r"\s+id\s+time\s+account\s+amount\s+kind\s+job_id\s+worker\s+model\s+memo", lines[1]), lines[1]
    rows = [line for line in lines if cast["alice"] in line]
    assert len(rows) == 5  # job B (debit, tax), job D (debit, tax), the transfer
    assert any(re.search(r"-20\.00\s+generation", r) for r in rows) and any("thanks" in r for r in rows)
    assert lines[-1].strip() == "(no more pages)"


def test_entries_filters_and_pages(settings: Settings, cast: dict[str, str]) -> None:
    first = horde(settings, "admin", "report", "entries", "--worker", cast["w9"], "--per-page", "5", *SPAN)
    assert first.returncode == 0, first.stderr
    assert "more: add --page 2" in first.stdout
    second = horde(settings, "admin", "report", "entries", "--worker", cast["w9"], "--per-page", "5", "--page", "2",
                   *SPAN)
    assert len([ln for ln in first.stdout.splitlines() + second.stdout.splitlines() if cast["w9"] in ln]) == 8
    admin = horde(settings, "admin", "report", "entries", "--kind", "admin", "--csv", *SPAN)
    rows = list(csv.DictReader(io.StringIO(admin.stdout)))
    assert sorted((r["account"], r["amount"]) for r in rows) == sorted(
        [(cast["alice"], "100.00"), ("MINT", "-100.00"), (cast["carol"], "-3.00"), ("BURN", "3.00")])


def test_summary_by_model_and_top_earners(settings: Settings, cast: dict[str, str]) -> None:
    result = horde(settings, "admin", "report", "summary", "--group-by", "model", *SPAN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Ledger summary by model (kudos), since 2002-03-01")
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[3:-1]}
    assert table == {"m1": ["15.00", "15.75", "2", "3.50", "0"], "m2": ["20.00", "21.00", "1", "3.00", "0"],
                     "t1": ["4.00", "4.20", "1", "0.00", "300"]}
    assert "(3 groups)" in result.stdout

    top = horde(settings, "admin", "report", "summary", "--group-by", "user", "--sort", "earned", "--top", "1", "--csv",
                *SPAN)
    [row] = list(csv.DictReader(io.StringIO(top.stdout)))
    assert (row["group"], row["earned"], row["jobs"], row["megapixelsteps"]) == (cast["bob"], "80.00", "2", "4.5")


def test_the_plain_report_still_shows_balances_and_movements(settings: Settings, cast: dict[str, str]) -> None:
    result = horde(settings, "admin", "report", "--limit", "5")
    assert result.returncode == 0, result.stderr
    assert "Balances (kudos)" in result.stdout and "Recent movements (latest 5 entries)" in result.stdout


def test_report_mistakes_get_one_clear_line(settings: Settings, cast: dict[str, str]) -> None:
    for argv, expected in [
        (("entries", "--account", "ghost#999999"), "No user"),
        (("entries", "--worker", "no-such-gpu"), "No worker"),
        (("entries", "--per-page", "5000"), "--per-page"),
        (("entries", "--since", "last tuesday"), "ISO 8601"),
        (("summary", "--group-by", "week"), "invalid choice"),
    ]:
        result = horde(settings, "admin", "report", *argv)
        assert result.returncode != 0 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
