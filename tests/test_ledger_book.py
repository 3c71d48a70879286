"""The ledger's book, on SQLite and on real PostgreSQL: postings apply once, balances follow,
and reconcile() finds no drift.

The PostgreSQL case uses a database of its own (made like the ``database_url`` fixture's) so that
reconcile(), a whole-ledger check, never sees another module's test data. Each test runs in a
transaction that is rolled back, except the concurrency tests, which must commit.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import Connection, Engine, func, select, text

import migrations
from broker.messages import JobDone
from config.database import make_sync_engine
from ledger import book, report
from ledger.errors import InvalidPosting, PostingConflict
from ledger.pricing import horde_tax
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT, entries
from tests import services

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with services.migrated_database(prefix="horde_ledger_test") as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('ledger')) / 'ledger.db'}"
    migrations.upgrade(url)
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    pool = {"pool_size": 12, "max_overflow": 0} if request.param == "postgresql" else {}
    eng = make_sync_engine(url, **pool)
    yield eng
    eng.dispose()


@pytest.fixture
def conn(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


def job_done(*, kudos: float = 12.5, requester: int = 1, owner: int = 2, job_id: str | None = None) -> JobDone:
    return JobDone(
        job_id=job_id or str(uuid.uuid4()), request_id=str(uuid.uuid4()), requester_id=requester,
        worker_id=7, worker_owner_id=owner, worker_name="gpu-box", model="tiny-sd", kind="image",
        kudos=kudos, megapixelsteps=1.3, finished_at=NOW,
    )


def units(conn: Connection, account: int) -> int:
    return book.balance_units(conn, account)


# --- settlement ----------------------------------------------------------------------------------


def test_settle_debits_requester_and_credits_owner_equally(conn: Connection) -> None:
    done = job_done(kudos=12.5, requester=11, owner=12)

    assert book.settle_job(conn, done, NOW) is True

    tax = horde_tax(12.5)  # 0.63: the requester pays it on top, the horde burns it
    assert book.balance(conn, 11) == pytest.approx(-12.5 - tax)
    assert book.balance(conn, 12) == 12.5
    assert book.balance(conn, BURN_ACCOUNT) == pytest.approx(tax)
    rows = conn.execute(select(entries).where(entries.c.job_id == done.job_id).order_by(entries.c.amount)).all()
    assert [(r.account_id, r.amount, r.kind, r.key) for r in rows] == [
        (11, -1250, "generation", f"job:{done.job_id}:debit"),
        (11, -63, "tax", f"job:{done.job_id}:tax-debit"),
        (BURN_ACCOUNT, 63, "tax", f"job:{done.job_id}:tax"),
        (12, 1250, "generation", f"job:{done.job_id}:credit"),
    ]
    assert {(r.worker_id, r.model, r.memo) for r in rows} == {(7, "tiny-sd", "image by gpu-box")}
    assert report.reconcile(conn) == []


def test_settling_the_same_job_twice_applies_once(conn: Connection) -> None:
    done = job_done(kudos=3.0, requester=21, owner=22)

    assert book.settle_job(conn, done, NOW) is True
    assert book.settle_job(conn, done, NOW) is False
    # A second event for the same job, even with another price, changes nothing.
    assert book.settle_job(conn, done.model_copy(update={"kudos": 99.0}), NOW) is False

    assert (units(conn, 21), units(conn, 22)) == (-300 - 15, 300)
    assert conn.execute(select(func.count()).where(entries.c.job_id == done.job_id)).scalar_one() == 4


def test_a_free_job_posts_nothing(conn: Connection) -> None:
    done = job_done(kudos=0.0, requester=31, owner=32)

    assert book.settle_job(conn, done, NOW) is False

    assert conn.execute(select(func.count()).where(entries.c.job_id == done.job_id)).scalar_one() == 0
    assert book.balance(conn, 31) == 0.0


def test_a_worker_serving_its_own_owner_nets_to_zero(conn: Connection) -> None:
    assert book.settle_job(conn, job_done(kudos=5, requester=41, owner=41), NOW) is True

    assert book.balance(conn, 41) == -horde_tax(5)  # only the tax leaves
    assert report.reconcile(conn) == []


def test_balances_go_negative(conn: Connection) -> None:
    for _ in range(3):
        book.settle_job(conn, job_done(kudos=10.01, requester=0, owner=51), NOW)

    assert book.balance(conn, 0) == pytest.approx(-30.03 - 3 * horde_tax(10.01))
    assert units(conn, 0) == -3003 - 3 * 50
    assert book.balance(conn, 51) == pytest.approx(30.03)
    assert book.balance(conn, 999_999) == 0.0  # unknown account


@pytest.mark.parametrize("requester, owner", [(MINT_ACCOUNT, 2), (1, BURN_ACCOUNT), (-5, 2)])
def test_system_accounts_are_never_a_party_to_a_job(conn: Connection, requester: int, owner: int) -> None:
    with pytest.raises(InvalidPosting):
        book.settle_job(conn, job_done(requester=requester, owner=owner), NOW)


# --- grants, transfers, postings -------------------------------------------------------------


def test_grant_mints_into_the_account_and_reconcile_stays_clean(conn: Connection) -> None:
    mint_before = units(conn, MINT_ACCOUNT)

    assert book.grant(conn, 61, 1000, reason="welcome", key="welcome-61", now=NOW) is True
    assert book.grant(conn, 61, 1000, reason="welcome", key="welcome-61", now=NOW) is False
    assert book.grant(conn, 61, 0.5, reason="tip", now=NOW) is True  # no key: always a new grant

    assert book.balance(conn, 61) == 1000.5
    assert units(conn, MINT_ACCOUNT) - mint_before == -100_050
    memos = conn.execute(select(entries.c.memo).where(entries.c.account_id == 61)).scalars().all()
    assert sorted(memos) == ["tip", "welcome"]
    t = report.totals(conn)
    assert t.users == t.minted - t.burned
    assert report.reconcile(conn) == []


@pytest.mark.parametrize("kudos", [0, -5, float("nan"), float("inf"), 1e300])
def test_grant_refuses_amounts_that_are_not_positive_kudos(conn: Connection, kudos: float) -> None:
    with pytest.raises(InvalidPosting):
        book.grant(conn, 1, kudos, reason="x", now=NOW)


def test_transfer_moves_kudos_between_users(conn: Connection) -> None:
    assert book.transfer(conn, 71, 72, 2.25, key="t1", memo="thanks", now=NOW) is True
    assert book.transfer(conn, 71, 72, 2.25, key="t1", memo="thanks", now=NOW) is False

    assert (book.balance(conn, 71), book.balance(conn, 72)) == (-2.25, 2.25)


@pytest.mark.parametrize(
    "legs",
    [
        [book.Leg(1, -100, "x:a"), book.Leg(2, 99, "x:b")],  # does not sum to zero
        [book.Leg(1, -100, "x:a"), book.Leg(2, 100, "y:b")],  # two groups
        [book.Leg(1, -100, "x:a"), book.Leg(2, 100, "x:a")],  # one key twice
        [book.Leg(1, -100, "nogroup"), book.Leg(2, 100, "x:b")],  # key without a group
        [book.Leg(1, 0, "x:a"), book.Leg(2, 0, "x:b")],  # zero legs
        [book.Leg(-9, -100, "x:a"), book.Leg(2, 100, "x:b")],  # no such account
        [],
    ],
)
def test_post_refuses_invalid_postings(conn: Connection, legs: list[book.Leg]) -> None:
    with pytest.raises(InvalidPosting):
        book.post(conn, legs, kind="admin", now=NOW)


def test_post_refuses_a_posting_whose_keys_are_partly_taken(conn: Connection) -> None:
    book.post(conn, [book.Leg(MINT_ACCOUNT, -100, "p:mint"), book.Leg(81, 100, "p:credit")], kind="admin", now=NOW)

    with pytest.raises(PostingConflict):
        book.post(conn, [book.Leg(MINT_ACCOUNT, -100, "p:mint"), book.Leg(82, 100, "p:other")], kind="admin", now=NOW)


def test_post_many_applies_a_posting_repeated_in_one_batch_once(conn: Connection) -> None:
    posting = book.job_posting(job_done(kudos=1, requester=91, owner=92))
    other = book.job_posting(job_done(kudos=2, requester=91, owner=92))
    assert posting is not None and other is not None

    assert book.post_many(conn, [posting, other, posting], now=NOW) == [True, True, False]

    assert (units(conn, 91), units(conn, 92)) == (-300 - 15, 300)  # plus 5% tax on each


# --- reports ---------------------------------------------------------------------------------


def test_reconcile_reports_drift(conn: Connection) -> None:
    book.grant(conn, 101, 10, reason="seed", now=NOW)
    conn.execute(text("UPDATE balances SET balance = balance + 1 WHERE account_id = 101"))
    conn.execute(
        entries.insert().values(key="rogue:leg", account_id=102, amount=5, kind="admin", memo="", created_at=NOW)
    )

    drifts = report.reconcile(conn)

    assert any("sum to 0.01, not 0" in d for d in drifts)
    assert any("minted - burned" in d for d in drifts)
    assert any(d.startswith("account 101: balance") for d in drifts)
    assert any(d.startswith("account 102: balance 0.00, but its entries sum to 0.05") for d in drifts)
    assert "posting rogue sums to 0.05, not 0" in drifts


def test_report_shows_balances_totals_and_movements(conn: Connection) -> None:
    book.grant(conn, 111, 1234.5, reason="welcome bonus", now=NOW)
    done = job_done(kudos=12.34, requester=111, owner=112)
    book.settle_job(conn, done, NOW)

    text_report = report.report(conn, account_names={111: "alice", 112: "bob"}, limit=6)

    assert "111 (alice)" in text_report and "112 (bob)" in text_report
    assert "MINT" in text_report
    assert "1,221.54" in text_report  # alice after paying 12.34 and 0.62 tax
    assert "check: ok" in text_report
    assert done.job_id in text_report and "welcome bonus" in text_report
    assert "latest 6 entries" in text_report


# --- property: any sequence of movements keeps the books --------------------------------------

ACCOUNTS = st.integers(min_value=1_000_000, max_value=1_000_004)
AMOUNTS = st.integers(min_value=0, max_value=5_000_000)  # hundredths
operations = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.sampled_from(["g0", "g1", "g2"]), ACCOUNTS, ACCOUNTS,
                  AMOUNTS.filter(bool)),
        st.tuples(st.just("settle"), st.sampled_from(["j0", "j1", "j2", "j3"]), ACCOUNTS, ACCOUNTS, AMOUNTS),
        st.tuples(st.just("transfer"), st.sampled_from(["t0", "t1"]), ACCOUNTS, ACCOUNTS, AMOUNTS.filter(bool)),
    ),
    max_size=25,
)


def apply_to_model(model: Counter[int], posted: set[str], op: tuple[str, str, int, int, int]) -> None:
    """The obvious semantics: each group applies once; a free job or a self-transfer is nothing."""
    kind, key, a, b, amount = op
    group = {"grant": f"grant:{key}", "settle": f"job:{key}", "transfer": f"transfer:{key}"}[kind]
    if group in posted or amount == 0 or (kind == "transfer" and a == b):
        return
    posted.add(group)
    source = MINT_ACCOUNT if kind == "grant" else a
    model[source] -= amount
    model[b] += amount
    if kind == "settle":
        tax = round(horde_tax(amount / 100) * 100)
        model[a] -= tax
        model[BURN_ACCOUNT] += tax


def apply_to_ledger(conn: Connection, op: tuple[str, str, int, int, int]) -> None:
    kind, key, a, b, amount = op
    kudos = amount / 100
    if kind == "grant":
        book.grant(conn, b, kudos, reason="prop", key=key, now=NOW)
    elif kind == "settle":
        book.settle_job(conn, job_done(kudos=kudos, requester=a, owner=b, job_id=key), NOW)
    elif a != b:
        book.transfer(conn, a, b, kudos, key=key, now=NOW)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_of_movements_keeps_the_books(engine: Engine, ops: list[tuple[str, str, int, int, int]]) -> None:
    with engine.connect() as conn, conn.begin() as transaction:
        before = {a: round(k * 100) for a, k in book.balances(conn).items()}
        model: Counter[int] = Counter()
        posted: set[str] = set()
        for op in ops:
            apply_to_model(model, posted, op)
            apply_to_ledger(conn, op)
            apply_to_ledger(conn, op)  # every message may arrive twice

        after = {a: round(k * 100) for a, k in book.balances(conn).items()}
        changed = {a: after.get(a, 0) - before.get(a, 0) for a in after.keys() | before.keys()}
        assert {a: d for a, d in changed.items() if d} == {a: d for a, d in model.items() if d}
        assert report.reconcile(conn) == []
        transaction.rollback()


# --- PostgreSQL concurrency ------------------------------------------------------------------


def run_concurrently(n: int, work) -> list:  # type: ignore[no-untyped-def,type-arg]
    barrier = threading.Barrier(n)
    results: list = [None] * n  # type: ignore[type-arg]
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    eng = make_sync_engine(pg_url, pool_size=12, max_overflow=0)
    yield eng
    eng.dispose()


def test_concurrent_settlements_of_one_job_apply_exactly_once(pg_engine: Engine) -> None:
    requester, owner = 2_000_001, 2_000_002
    done = job_done(kudos=7.77, requester=requester, owner=owner)

    def settle(_i: int) -> bool:
        with pg_engine.begin() as conn:
            applied = book.settle_job(conn, done, NOW)
            time.sleep(0.2)  # hold the transaction open so that the others run into it
            return applied

    results = run_concurrently(8, settle)

    assert sorted(results) == [False] * 7 + [True]
    with pg_engine.connect() as conn:
        assert (units(conn, requester), units(conn, owner)) == (-777 - 39, 777)  # 5% tax, rounded
        assert report.reconcile(conn) == []


def test_concurrent_batches_sharing_postings_in_any_order_neither_deadlock_nor_double(pg_engine: Engine) -> None:
    requester, owner = 2_000_011, 2_000_012
    postings = [book.job_posting(job_done(kudos=1, requester=requester, owner=owner)) for _ in range(20)]

    def post(i: int) -> int:
        batch = postings if i % 2 else list(reversed(postings))
        with pg_engine.begin() as conn:
            return sum(book.post_many(conn, batch, now=NOW))  # type: ignore[arg-type]

    assert sum(run_concurrently(6, post)) == 20
    with pg_engine.connect() as conn:
        assert (units(conn, requester), units(conn, owner)) == (-2000 - 20 * 5, 2000)


def test_concurrent_settlements_on_hot_accounts_all_count(pg_engine: Engine) -> None:
    requester, owner = 2_000_021, 2_000_022

    def settle_many(_i: int) -> int:
        applied = 0
        for _ in range(25):
            with pg_engine.begin() as conn:
                applied += book.settle_job(conn, job_done(kudos=0.01, requester=requester, owner=owner), NOW)
        return applied

    assert sum(run_concurrently(8, settle_many)) == 200
    with pg_engine.connect() as conn:
        assert (units(conn, requester), units(conn, owner)) == (-200 - 200, 200)  # the minimum tax is 0.01
        assert report.reconcile(conn) == []


def test_transfers_out_of_one_account_while_its_jobs_settle(pg_engine: Engine) -> None:
    """Concurrent transfers out of one account, and settlements charging it, all at once: every
    movement counts exactly once (each is also retried), and the books reconcile."""
    payer, owner = 2_000_031, 2_000_032
    receivers = [2_000_040 + i for i in range(4)]
    with pg_engine.begin() as conn:
        book.grant(conn, payer, 1000, reason="float", now=NOW)
    jobs = [job_done(kudos=1.5, requester=payer, owner=owner) for _ in range(40)]

    def work(i: int) -> int:
        applied = 0
        for k in range(10):
            with pg_engine.begin() as conn:
                if i % 2:  # transfers, each sent twice with the same key
                    key = f"t-{i}-{k}"
                    applied += book.transfer(conn, payer, receivers[i % 4], 2.0, key=key, now=NOW)
                    book.transfer(conn, payer, receivers[i % 4], 2.0, key=key, now=NOW)
                else:  # settlements, each delivered twice
                    done = jobs[(i // 2) * 10 + k]
                    applied += book.settle_job(conn, done, NOW)
                    book.settle_job(conn, done, NOW)
        return applied

    assert sum(run_concurrently(8, work)) == 80  # 40 transfers and 40 settlements
    tax = round(horde_tax(1.5) * 100)
    with pg_engine.connect() as conn:
        assert units(conn, payer) == 100_000 - 40 * 200 - 40 * (150 + tax)
        assert units(conn, owner) == 40 * 150
        assert sum(units(conn, r) for r in receivers) == 40 * 200
        assert report.reconcile(conn) == []
