"""The append-only double-entry ledger: posting movements and reading balances.

Invariants (``ledger.report.reconcile`` checks them):

- A *posting* is a set of legs summing to zero. Each leg is one ``ledger_entries`` row with a
  unique key ``<group>:<leg>``; all legs of a posting share the group (``job:<id>``,
  ``grant:<id>``), so every group sums to zero.
- A posting applies all or nothing, and at most once: its rows are inserted with
  ``ON CONFLICT DO NOTHING``. No new row means it was posted before (a no-op, ``False``); some
  but not all rows new means two different movements share a key (``PostingConflict``).
- ``balances`` is a projection of the entries, updated in the same transaction.
- Money enters through MINT and leaves through BURN, so ``sum(user balances) == minted - burned``.
  Balances have no floor.

Every function takes a ``Connection`` in a transaction its caller owns and never commits.

Concurrency (PostgreSQL, READ COMMITTED): a transaction inserting a key that another one has
inserted but not committed waits for it, then skips the row. So two transactions posting the
same keys apply it exactly once. One call writes entries in key order, then balances in account
order, so concurrent calls take their locks in one global order and cannot deadlock each other.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, TextClause, select, text
from sqlalchemy.dialects import postgresql, sqlite

from broker.messages import JobDone, UptimeEarned
from ledger.errors import InvalidPosting, PostingConflict, UnsupportedDatabase
from ledger.pricing import horde_tax
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT, balances as balances_table, entries
from ledger.units import UNITS_PER_KUDO, to_kudos, to_units

#: Reasons a movement may have (``ledger_entries.kind``).
KINDS = frozenset({"generation", "uptime", "transfer", "admin", "tax"})
SYSTEM_ACCOUNTS = frozenset({MINT_ACCOUNT, BURN_ACCOUNT})

MAX_LEG_UNITS = 10**15  # ten trillion kudos; keeps every sum far inside BIGINT
MAX_ACCOUNT_ID = 2**31 - 1  # INTEGER columns


def column_length(column: ColumnElement[Any]) -> int:
    """The declared length of a String column."""
    return int(getattr(column.type, "length"))  # noqa: B009 - TypeEngine does not declare it


_KEY_LEN = column_length(entries.c.key)
_JOB_ID_LEN = column_length(entries.c.job_id)
_MODEL_LEN = column_length(entries.c.model)
_MEMO_LEN = column_length(entries.c.memo)


@dataclass(frozen=True)
class Leg:
    """One side of a posting: ``amount`` hundredths of a kudo (+ credit, - debit) on an account."""

    account_id: int
    amount: int
    key: str
    kind: str | None = None  # overrides the posting's kind for this entry (e.g. the tax legs of a job)


@dataclass(frozen=True)
class Posting:
    """A movement: legs summing to zero plus what it was for. Validated on construction."""

    legs: tuple[Leg, ...]
    kind: str
    job_id: str | None = None
    worker_id: int | None = None
    model: str | None = None
    memo: str = ""
    megapixelsteps: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "legs", tuple(self.legs))
        object.__setattr__(self, "memo", self.memo[:_MEMO_LEN])
        _validate(self)

    @property
    def group(self) -> str:
        return group_of(self.legs[0].key)

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(leg.key for leg in self.legs)


def group_of(key: str) -> str:
    """The posting group of an entry key: everything before its last colon."""
    return key.rpartition(":")[0]


def _validate(p: Posting) -> None:
    if p.kind not in KINDS:
        raise InvalidPosting(f"unknown kind {p.kind!r}; expected one of {sorted(KINDS)}")
    if not p.legs:
        raise InvalidPosting("a posting needs legs")
    total = sum(leg.amount for leg in p.legs)
    if total != 0:
        raise InvalidPosting(f"legs of {p.legs[0].key!r} sum to {total}, not 0")
    if len(p.keys) != len(p.legs):
        raise InvalidPosting(f"duplicate keys in one posting: {sorted(leg.key for leg in p.legs)}")
    groups = {group_of(leg.key) for leg in p.legs}
    if len(groups) != 1 or "" in groups:
        raise InvalidPosting(f"keys must share one '<group>:' prefix, got {sorted(p.keys)}")
    for leg in p.legs:
        _validate_leg(leg)
    if p.job_id is not None and not 0 < len(p.job_id) <= _JOB_ID_LEN:
        raise InvalidPosting(f"job id must be 1..{_JOB_ID_LEN} characters")
    if p.worker_id is not None and not 0 <= p.worker_id <= MAX_ACCOUNT_ID:
        raise InvalidPosting(f"worker id {p.worker_id} out of range")
    if p.model is not None and len(p.model) > _MODEL_LEN:
        raise InvalidPosting(f"model name longer than {_MODEL_LEN} characters")


def _validate_leg(leg: Leg) -> None:
    if leg.kind is not None and leg.kind not in KINDS:
        raise InvalidPosting(f"{leg.key!r}: unknown kind {leg.kind!r}")
    if not isinstance(leg.amount, int) or isinstance(leg.amount, bool):
        raise InvalidPosting(f"{leg.key!r}: amount must be integer hundredths of a kudo")
    if leg.amount == 0 or abs(leg.amount) > MAX_LEG_UNITS:
        raise InvalidPosting(f"{leg.key!r}: amount {leg.amount} must be non-zero and at most {MAX_LEG_UNITS}")
    if not leg.key.rpartition(":")[2] or len(leg.key) > _KEY_LEN:
        raise InvalidPosting(f"key {leg.key!r} must be '<group>:<leg>' and at most {_KEY_LEN} characters")
    if leg.account_id not in SYSTEM_ACCOUNTS and not 0 <= leg.account_id <= MAX_ACCOUNT_ID:
        raise InvalidPosting(f"{leg.key!r}: no such account {leg.account_id}")


def check_user_account(account_id: int, role: str = "account") -> None:
    """User accounts are the non-negative user ids; system accounts are never a party."""
    if not 0 <= account_id <= MAX_ACCOUNT_ID:
        raise InvalidPosting(f"{role} {account_id} is not a user account")


def kudos_units(kudos: float) -> int:
    """Kudos as integer hundredths; refuses NaN, infinities and amounts past MAX_LEG_UNITS."""
    if not math.isfinite(kudos):
        raise InvalidPosting(f"{kudos} is not an amount of kudos")
    if abs(kudos) > MAX_LEG_UNITS / UNITS_PER_KUDO:
        raise InvalidPosting(f"{kudos} kudos is beyond the ledger's range")
    return to_units(kudos)


# --- writing -----------------------------------------------------------------------------------


def _insert(conn: Connection, table: Table) -> Any:
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise UnsupportedDatabase(f"the ledger runs on PostgreSQL or SQLite, not {name}")


def insert_ignoring_duplicates(conn: Connection, table: Table, rows: list[dict[str, Any]],
                               returning: str) -> set[Any]:
    """Insert ``rows`` (all with the same keys), skipping those whose unique column exists; the
    ``returning`` values written. Rows are inserted in the order given (callers sort them so that
    concurrent transactions lock keys in one order)."""
    if not rows:
        return set()
    if conn.dialect.name == "postgresql":
        return _insert_unnest(conn, table, rows, returning)
    # An executemany with RETURNING: SQLAlchemy sends it as a few multi-row INSERTs ("insertmanyvalues").
    stmt = _insert(conn, table).on_conflict_do_nothing().returning(table.c[returning])
    return set(conn.execute(stmt, rows).scalars())


def _insert_unnest(conn: Connection, table: Table, rows: list[dict[str, Any]], returning: str) -> set[Any]:
    """PostgreSQL: one array per column and ``INSERT … SELECT FROM unnest(…)``. The statement text
    is the same whatever the number of rows, so it is parsed and planned as one small statement
    instead of a VALUES list of rows × columns literals (measured: docs/benchmarks.md)."""
    columns = list(rows[0])
    params = {f"c{i}": [row[name] for row in rows] for i, name in enumerate(columns)}
    return set(conn.execute(_unnest_statement(conn, table, tuple(columns), returning), params).scalars())


_UNNEST_STATEMENTS: dict[tuple[str, tuple[str, ...], str], TextClause] = {}


def _unnest_statement(conn: Connection, table: Table, columns: tuple[str, ...], returning: str) -> TextClause:
    cache_key = (table.name, columns, returning)
    stmt = _UNNEST_STATEMENTS.get(cache_key)
    if stmt is None:
        quote = conn.dialect.identifier_preparer.quote
        names = ", ".join(quote(name) for name in columns)
        arrays = ", ".join(f"CAST(:c{i} AS {table.c[name].type.compile(dialect=conn.dialect)}[])"
                           for i, name in enumerate(columns))
        stmt = text(
            f"INSERT INTO {quote(table.name)} ({names}) "
            f"SELECT {names} FROM unnest({arrays}) WITH ORDINALITY AS u({names}, horde_ordinal) "
            f"ORDER BY horde_ordinal ON CONFLICT DO NOTHING RETURNING {quote(returning)}"
        )
        _UNNEST_STATEMENTS[cache_key] = stmt
    return stmt


def _fresh_in_call(postings: Sequence[Posting]) -> list[int]:
    """Indexes of the postings not repeated earlier in the same call; partial overlaps refused."""
    owner: dict[str, int] = {}
    fresh: list[int] = []
    for i, p in enumerate(postings):
        seen = {owner.get(k) for k in p.keys}
        if seen == {None}:
            owner.update(dict.fromkeys(p.keys, i))
            fresh.append(i)
        elif None in seen or len(seen) != 1 or postings[seen.pop()].keys != p.keys:  # type: ignore[index]
            raise PostingConflict(f"posting {p.group!r} overlaps another one in the same batch")
    return fresh


def _entry_rows(postings: Iterable[Posting], now: datetime) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"key": leg.key, "account_id": leg.account_id, "amount": leg.amount, "kind": leg.kind or p.kind,
         "job_id": p.job_id, "worker_id": p.worker_id, "model": p.model, "memo": p.memo,
         "megapixelsteps": p.megapixelsteps if leg.kind is None else 0.0,
         "tokens": p.tokens if leg.kind is None else 0, "created_at": now}
        for p in postings for leg in p.legs
    ]
    rows.sort(key=lambda r: r["key"])
    return rows


def _project(conn: Connection, postings: Iterable[Posting], now: datetime) -> None:
    """Add the postings' net amount per account to the balance projection, in account order."""
    deltas: dict[int, int] = defaultdict(int)
    for p in postings:
        for leg in p.legs:
            deltas[leg.account_id] += leg.amount
    rows = [{"account_id": a, "balance": d, "updated_at": now} for a, d in sorted(deltas.items()) if d]
    if not rows:
        return
    stmt = _insert(conn, balances_table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[balances_table.c.account_id],
        set_={"balance": balances_table.c.balance + stmt.excluded.balance, "updated_at": stmt.excluded.updated_at},
    ).returning(balances_table.c.account_id)  # RETURNING makes the executemany a few multi-row statements
    conn.execute(stmt, rows).all()


def post_many(conn: Connection, postings: Sequence[Posting], *, now: datetime) -> list[bool]:
    """Apply each posting once; per posting, ``True`` if applied now, ``False`` if already posted.

    Raises ``PostingConflict`` (after writing rows: the caller must roll back) when a posting's
    keys are only partly in the ledger.
    """
    applied = [False] * len(postings)
    fresh = _fresh_in_call(postings)
    written = insert_ignoring_duplicates(conn, entries, _entry_rows((postings[i] for i in fresh), now), "key")
    for i in fresh:
        new = len(postings[i].keys & written)
        if new == len(postings[i].legs):
            applied[i] = True
        elif new:
            raise PostingConflict(f"posting {postings[i].group!r}: some of its keys were already posted")
    _project(conn, (p for p, ok in zip(postings, applied, strict=True) if ok), now)
    return applied


def post(conn: Connection, legs: Sequence[Leg], *, kind: str, job_id: str | None = None,
         worker_id: int | None = None, model: str | None = None, memo: str = "", now: datetime) -> bool:
    """Post one movement; ``False`` if its keys were posted before (nothing changes)."""
    posting = Posting(tuple(legs), kind, job_id=job_id, worker_id=worker_id, model=model, memo=memo)
    return post_many(conn, [posting], now=now)[0]


def job_posting(done: JobDone) -> Posting | None:
    """The settlement of a completed job: the requester pays the worker's owner the price, and the
    horde tax on top, which is burned (ledger.pricing.horde_tax). None if free."""
    units = kudos_units(done.kudos)
    if units == 0:
        return None
    check_user_account(done.requester_id, "requester")
    check_user_account(done.worker_owner_id, "worker owner")
    tax = kudos_units(horde_tax(done.kudos))
    group = f"job:{done.job_id}"
    return Posting(
        (Leg(done.requester_id, -units, f"{group}:debit"), Leg(done.worker_owner_id, units, f"{group}:credit"),
         Leg(done.requester_id, -tax, f"{group}:tax-debit", kind="tax"),
         Leg(BURN_ACCOUNT, tax, f"{group}:tax", kind="tax")),
        "generation", job_id=done.job_id, worker_id=done.worker_id, model=done.model,
        memo=f"{done.kind} by {done.worker_name}", megapixelsteps=done.megapixelsteps, tokens=done.tokens,
    )


def uptime_posting(event: UptimeEarned) -> Posting:
    """An uptime reward: minted to the worker's owner, once per (worker, streak, interval)."""
    check_user_account(event.owner_id, "worker owner")
    group = f"uptime:{event.worker_id}:{int(event.streak_start.timestamp())}:{event.interval}"
    units = kudos_units(event.kudos)
    return Posting(
        (Leg(MINT_ACCOUNT, -units, f"{group}:mint"), Leg(event.owner_id, units, f"{group}:credit")),
        "uptime", worker_id=event.worker_id, memo=f"uptime of {event.worker_name}, interval {event.interval}",
    )


def settle_job(conn: Connection, done: JobDone, now: datetime) -> bool:
    """Debit the requester and credit the worker's owner ``done.kudos``; once per job."""
    posting = job_posting(done)
    return posting is not None and post_many(conn, [posting], now=now)[0]


def grant(conn: Connection, account_id: int, kudos: float, *, reason: str, key: str | None = None,
          now: datetime) -> bool:
    """Mint ``kudos`` into a user account (an admin action). With ``key``, granting twice is once."""
    check_user_account(account_id)
    units = kudos_units(kudos)
    if units <= 0:
        raise InvalidPosting("a grant must be at least 0.01 kudos")
    group = f"grant:{key or uuid.uuid4().hex}"
    legs = [Leg(MINT_ACCOUNT, -units, f"{group}:mint"), Leg(account_id, units, f"{group}:credit")]
    return post(conn, legs, kind="admin", memo=reason, now=now)


def transfer(conn: Connection, source_id: int, target_id: int, kudos: float, *, memo: str = "",
             key: str | None = None, now: datetime) -> bool:
    """Move ``kudos`` between two user accounts; the source may go negative."""
    check_user_account(source_id, "source")
    check_user_account(target_id, "target")
    units = kudos_units(kudos)
    if units <= 0:
        raise InvalidPosting("a transfer must be at least 0.01 kudos")
    if source_id == target_id:
        raise InvalidPosting("a transfer needs two different accounts")
    group = f"transfer:{key or uuid.uuid4().hex}"
    legs = [Leg(source_id, -units, f"{group}:debit"), Leg(target_id, units, f"{group}:credit")]
    return post(conn, legs, kind="transfer", memo=memo, now=now)


# --- reading -----------------------------------------------------------------------------------


def balance_units(conn: Connection, account_id: int) -> int:
    """An account's balance in hundredths of a kudo; 0 for an account with no movements."""
    value = conn.execute(
        select(balances_table.c.balance).where(balances_table.c.account_id == account_id)
    ).scalar_one_or_none()
    return int(value or 0)


def balance(conn: Connection, account_id: int) -> float:
    """An account's balance in kudos; 0 for an account with no movements."""
    return to_kudos(balance_units(conn, account_id))


def balances(conn: Connection) -> dict[int, float]:
    """Every account's balance in kudos, system accounts (MINT, BURN: negative ids) included."""
    rows = conn.execute(select(balances_table.c.account_id, balances_table.c.balance))
    return {int(a): to_kudos(int(b)) for a, b in rows}
