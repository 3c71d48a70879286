"""Admin reports on the ledger: movements, summaries, a readable overview, and a reconciliation.

Everything here only reads, takes a ``Connection`` and is plain SQLAlchemy Core, so the admin API
(``api.admin``) and the CLI (``horde admin report``) share it. Amounts are hundredths of a kudo.

``entries_page`` lists movements newest first (ties broken by id), filtered and paged.
``summary`` folds the users' entries by day (UTC), user, worker or model:

- *earned*: credits to users of kind generation (a worker's owner paid for a job) or uptime;
- *spent*: debits of users of kind generation or tax (a requester paying for a job, and its tax);
- *jobs*: settled jobs, each counted once per group; a user's jobs are those it requested or its
  workers served (once if both); *megapixelsteps* and *tokens*: the work of those jobs.

Admin grants and revokes and transfers between users are neither earned nor spent (they are
movements, listed by ``entries_page``), so a group with only those has no row. Entries of system
accounts (MINT, BURN) are not folded.

``reconcile`` returns descriptions of drift, empty when the ledger is sound:

1. all balances, system accounts included, sum to zero (every posting sums to zero);
2. the users' balances sum to minted - burned (minted = -balance(MINT), burned = balance(BURN));
3. every balance equals the sum of its account's entries (the projection matches the entries),
   and no entry names an account that is neither a user nor a system account;
4. every posting group (``job:<id>``, ``grant:<id>``, …; see ``ledger.book``) sums to zero.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Connection, Date, Select, Table, cast, func, literal_column, select

from config.database import as_utc
from ledger.book import SYSTEM_ACCOUNTS, group_of
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT, balances, entries
from ledger.units import to_kudos, to_units

SYSTEM_NAMES = {MINT_ACCOUNT: "MINT", BURN_ACCOUNT: "BURN"}
MAX_DRIFTS_PER_CHECK = 20


@dataclass(frozen=True)
class Totals:
    """Ledger totals in hundredths of a kudo."""

    minted: int
    burned: int
    users: int  # sum of the users' balances

    @property
    def balanced(self) -> bool:
        return self.users == self.minted - self.burned


def totals(conn: Connection) -> Totals:
    rows = dict(conn.execute(
        select(balances.c.account_id, balances.c.balance).where(balances.c.account_id.in_(SYSTEM_ACCOUNTS))
    ).tuples().all())
    users = conn.execute(
        select(func.coalesce(func.sum(balances.c.balance), 0)).where(balances.c.account_id >= 0)
    ).scalar_one()
    return Totals(minted=-int(rows.get(MINT_ACCOUNT, 0)), burned=int(rows.get(BURN_ACCOUNT, 0)), users=int(users))


def fmt(units: int) -> str:
    """Hundredths of a kudo as kudos with two decimals and thousands separators."""
    sign = "-" if units < 0 else ""
    whole, cents = divmod(abs(units), 100)
    return f"{sign}{whole:,}.{cents:02d}"


# --- reconcile ---------------------------------------------------------------------------------


def reconcile(conn: Connection) -> list[str]:
    """Descriptions of every drift from the ledger's invariants; empty when it is sound."""
    projected = _per_account(conn, balances, "account_id", "balance")
    posted = _per_account(conn, entries, "account_id", "amount")
    drifts: list[str] = []
    if (total := sum(projected.values())) != 0:
        drifts.append(f"balances of all accounts sum to {fmt(total)}, not 0")
    t = totals(conn)
    if not t.balanced:
        drifts.append(
            f"user balances sum to {fmt(t.users)}, but minted - burned is {fmt(t.minted - t.burned)}"
        )
    drifts += _capped(_projection_drifts(projected, posted))
    drifts += _capped(
        f"posting {group} sums to {fmt(amount)}, not 0" for group, amount in sorted(_unbalanced_groups(conn))
    )
    return drifts


def _per_account(conn: Connection, table: Table, account: str, amount: str) -> dict[int, int]:
    rows = conn.execute(select(table.c[account], func.sum(table.c[amount])).group_by(table.c[account]))
    return {int(a): int(s) for a, s in rows}


def _projection_drifts(projected: Mapping[int, int], posted: Mapping[int, int]) -> list[str]:
    drifts = []
    for account in sorted(projected.keys() | posted.keys()):
        if account < 0 and account not in SYSTEM_ACCOUNTS:
            drifts.append(f"account {account} is neither a user nor a system account")
        have, want = projected.get(account, 0), posted.get(account, 0)
        if have != want:
            drifts.append(f"account {_label(account)}: balance {fmt(have)}, but its entries sum to {fmt(want)}")
    return drifts


def _unbalanced_groups(conn: Connection) -> list[tuple[str, int]]:
    if conn.dialect.name == "postgresql":
        group = func.regexp_replace(entries.c.key, ":[^:]*$", "")
        rows = conn.execute(
            select(group, func.sum(entries.c.amount)).group_by(group).having(func.sum(entries.c.amount) != 0)
        )
        return [(g, int(s)) for g, s in rows]
    sums: dict[str, int] = defaultdict(int)  # SQLite has no regexp: fold the keys here
    for key, amount in conn.execution_options(yield_per=10_000).execute(select(entries.c.key, entries.c.amount)):
        sums[group_of(key)] += amount
    return [(g, s) for g, s in sums.items() if s != 0]


def _capped(drifts: Iterable[str]) -> list[str]:
    items = list(drifts)
    if len(items) <= MAX_DRIFTS_PER_CHECK:
        return items
    return items[:MAX_DRIFTS_PER_CHECK] + [f"… and {len(items) - MAX_DRIFTS_PER_CHECK} more like these"]


# --- report ------------------------------------------------------------------------------------


def _label(account: int, names: Mapping[int, str] | None = None) -> str:
    if account in SYSTEM_NAMES:
        return SYSTEM_NAMES[account]
    name = (names or {}).get(account)
    return f"{account} ({name})" if name else str(account)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers), "  " + "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _balance_section(conn: Connection, names: Mapping[int, str], max_accounts: int) -> list[str]:
    rows = conn.execute(select(balances.c.account_id, balances.c.balance)).tuples().all()
    system = sorted((r for r in rows if r[0] in SYSTEM_ACCOUNTS), key=lambda r: -r[0])
    users = sorted((r for r in rows if r[0] not in SYSTEM_ACCOUNTS), key=lambda r: (-r[1], r[0]))
    shown = system + users[:max_accounts]
    lines = ["Balances (kudos)"]
    lines += _table(["account", "balance"], [[_label(a, names), fmt(b)] for a, b in shown], frozenset({1}))
    if len(users) > max_accounts:
        lines.append(f"  … and {len(users) - max_accounts} more accounts")
    return lines


def _totals_section(conn: Connection) -> list[str]:
    t = totals(conn)
    check = "ok" if t.balanced else "DRIFT: run reconcile"
    rows = [["minted", fmt(t.minted)], ["burned", fmt(t.burned)],
            ["user balances", fmt(t.users)], ["minted - burned", fmt(t.minted - t.burned)]]
    return ["Totals (kudos)"] + _table(["total", "kudos"], rows, frozenset({1})) + [f"  check: {check}"]


def _when(at: datetime) -> str:
    return (as_utc(at) or at).strftime("%Y-%m-%d %H:%M:%S")


def _movements_section(conn: Connection, names: Mapping[int, str], limit: int) -> list[str]:
    rows = conn.execute(
        select(entries.c.created_at, entries.c.kind, entries.c.account_id, entries.c.amount,
               entries.c.job_id, entries.c.memo).order_by(entries.c.id.desc()).limit(limit)
    ).tuples().all()
    table = [
        [_when(at), kind, _label(account, names), fmt(amount), job or "", memo]
        for at, kind, account, amount, job, memo in rows
    ]
    title = f"Recent movements (latest {len(table)} entries)"
    if not table:
        return [title, "  none yet"]
    return [title] + _table(["time (UTC)", "kind", "account", "amount", "job", "memo"], table, frozenset({3}))


def report(conn: Connection, *, account_names: Mapping[int, str] | None = None, limit: int = 20,
           max_accounts: int = 50) -> str:
    """A text report: balances (system accounts first, then the richest users), totals, and the
    ``limit`` latest entries. ``account_names`` labels user accounts (e.g. user aliases)."""
    names = account_names or {}
    sections = [
        _balance_section(conn, names, max_accounts),
        _totals_section(conn),
        _movements_section(conn, names, limit),
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


# --- movements and summaries (the admin reports) -------------------------------------------------

GROUPS = ("day", "user", "worker", "model")
METRICS = ("earned", "spent", "jobs", "megapixelsteps", "tokens")
EARNING_KINDS = ("generation", "uptime")
SPENDING_KINDS = ("generation", "tax")
MAX_PER_PAGE = 1000


@dataclass(frozen=True)
class EntryFilter:
    """Which movements to list; ``since`` is inclusive, ``until`` exclusive."""

    account_id: int | None = None
    worker_id: int | None = None
    model: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        c = entries.c
        wanted = [(c.account_id, self.account_id), (c.worker_id, self.worker_id), (c.model, self.model),
                  (c.kind, self.kind)]
        return [column == value for column, value in wanted if value is not None] + _period(self.since, self.until)


def _period(since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    # UTC throughout: SQLite keeps timestamps as naive UTC text, which compares correctly only with UTC.
    out = []
    if since is not None:
        out.append(entries.c.created_at >= utc(since))
    if until is not None:
        out.append(entries.c.created_at < utc(until))
    return out


def utc(at: datetime) -> datetime:
    """``at`` in UTC; a naive time is taken as UTC."""
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


@dataclass(frozen=True)
class Entry:
    id: int
    key: str
    created_at: datetime
    account_id: int
    amount: int
    kind: str
    job_id: str | None
    worker_id: int | None
    model: str | None
    memo: str
    megapixelsteps: float
    tokens: int


@dataclass(frozen=True)
class EntryPage:
    entries: list[Entry]
    page: int
    per_page: int
    has_more: bool


def entries_page(conn: Connection, where: EntryFilter, *, page: int = 1, per_page: int = 100) -> EntryPage:
    """One page (from 1) of the movements matching ``where``, newest first, ties broken by id."""
    if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
        raise ValueError(f"page is 1 or more, per_page 1..{MAX_PER_PAGE}")
    rows = conn.execute(
        select(*(entries.c[f] for f in Entry.__dataclass_fields__)).where(*where.conditions())
        .order_by(entries.c.created_at.desc(), entries.c.id.desc())
        .limit(per_page + 1).offset((page - 1) * per_page)
    ).all()
    found = [Entry(**{**row._asdict(), "created_at": utc(row.created_at)}) for row in rows[:per_page]]
    return EntryPage(found, page, per_page, has_more=len(rows) > per_page)


@dataclass(frozen=True)
class SummaryRow:
    """One group: its key (a ``YYYY-MM-DD`` day, a user or worker id, a model name) and its sums."""

    key: str | int
    earned: int
    spent: int
    jobs: int
    megapixelsteps: float
    tokens: int


def summary(conn: Connection, group_by: str, *, since: datetime | None = None, until: datetime | None = None,
            sort: str = "key", limit: int | None = None) -> list[SummaryRow]:
    """The users' entries folded per group (see the module docstring for each sum's meaning).

    ``sort`` is ``key`` (ascending) or a metric (descending, then by key); ``limit`` keeps the first
    groups in that order (e.g. the top ten earners: ``group_by="user", sort="earned", limit=10``).
    """
    if group_by not in GROUPS:
        raise ValueError(f"group_by is one of {', '.join(GROUPS)}")
    if sort not in ("key", *METRICS):
        raise ValueError(f"sort is key or one of {', '.join(METRICS)}")
    query = _summary_query(conn, group_by, _period(since, until)).subquery()
    order = [query.c.key] if sort == "key" else [query.c[sort].desc(), query.c.key]
    stmt = select(query).order_by(*order)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        SummaryRow(str(r.key) if group_by == "day" else r.key, int(r.earned), int(r.spent), int(r.jobs),
                   float(r.megapixelsteps), int(r.tokens))
        for r in conn.execute(stmt)
    ]


def _group_key(conn: Connection, group_by: str) -> ColumnElement[Any]:
    if group_by == "day":
        if conn.dialect.name == "postgresql":  # a literal, not a parameter: GROUP BY must see the same expression
            return cast(func.timezone(literal_column("'UTC'"), entries.c.created_at), Date)
        return func.date(entries.c.created_at)
    return {"user": entries.c.account_id, "worker": entries.c.worker_id, "model": entries.c.model}[group_by]


def _summary_query(conn: Connection, group_by: str, period: list[ColumnElement[bool]]) -> Select[Any]:
    c = entries.c
    key = _group_key(conn, group_by).label("key")
    generation = c.kind == "generation"
    earned = func.sum(c.amount).filter(c.kind.in_(EARNING_KINDS) & (c.amount > 0))
    spent = func.sum(-c.amount).filter(c.kind.in_(SPENDING_KINDS) & (c.amount < 0))
    where = [c.account_id >= 0, c.kind.in_(EARNING_KINDS + SPENDING_KINDS), key.isnot(None), *period]
    if group_by != "user":
        # Every leg of a settlement shares its day, worker and model: its one credit leg counts the job.
        credit = generation & (c.amount > 0)
        return select(key, _zero(earned).label("earned"), _zero(spent).label("spent"),
                      func.count().filter(credit).label("jobs"),
                      _zero(func.sum(c.megapixelsteps).filter(credit)).label("megapixelsteps"),
                      _zero(func.sum(c.tokens).filter(credit)).label("tokens")).where(*where).group_by(key)
    # A user may both request a job and own the worker that served it: fold per (user, job) first.
    per_job = select(key, c.job_id, earned.label("earned"), spent.label("spent"),
                     func.count().filter(generation).label("legs"),
                     func.max(c.megapixelsteps).filter(generation).label("megapixelsteps"),
                     func.max(c.tokens).filter(generation).label("tokens")
                     ).where(*where).group_by(key, c.job_id).subquery()
    j = per_job.c
    return select(j.key, _zero(func.sum(j.earned)).label("earned"), _zero(func.sum(j.spent)).label("spent"),
                  func.count().filter(j.job_id.isnot(None) & (j.legs > 0)).label("jobs"),
                  _zero(func.sum(j.megapixelsteps)).label("megapixelsteps"),
                  _zero(func.sum(j.tokens)).label("tokens")).group_by(j.key)


def _zero(value: ColumnElement[Any]) -> ColumnElement[Any]:
    return func.coalesce(value, 0)


# --- records: the one shape JSON, CSV and the CLI's tables are made from --------------------------

ENTRY_FIELDS = ("id", "time", "account_id", "account", "amount", "kind", "job_id", "worker_id", "worker", "model",
                "memo", "megapixelsteps", "tokens", "key")
SUMMARY_FIELDS = ("group", "id", *METRICS)


def entry_record(e: Entry, accounts: Mapping[int, str], workers: Mapping[int, str]) -> dict[str, Any]:
    """An entry with kudos (not hundredths), an ISO 8601 UTC time, and its account's and worker's names."""
    return {
        "id": e.id, "time": e.created_at.isoformat(), "account_id": e.account_id,
        "account": accounts.get(e.account_id) or _label(e.account_id), "amount": to_kudos(e.amount),
        "kind": e.kind, "job_id": e.job_id, "worker_id": e.worker_id,
        "worker": workers.get(e.worker_id) if e.worker_id is not None else None, "model": e.model,
        "memo": e.memo, "megapixelsteps": round(e.megapixelsteps, 4), "tokens": e.tokens, "key": e.key,
    }


def summary_record(row: SummaryRow, group_by: str, names: Mapping[int, str]) -> dict[str, Any]:
    """A group with kudos; ``group`` is its readable name, ``id`` the user's or worker's id."""
    numbered = group_by in ("user", "worker")
    return {
        "group": (names.get(row.key) or f"#{row.key}") if numbered else row.key,  # type: ignore[arg-type]
        "id": row.key if numbered else None,
        "earned": to_kudos(row.earned), "spent": to_kudos(row.spent), "jobs": row.jobs,
        "megapixelsteps": round(row.megapixelsteps, 4), "tokens": row.tokens,
    }


def to_csv(fields: Sequence[str], records: Iterable[Mapping[str, Any]]) -> str:
    """Records as CSV with a header row; kudos with two decimals, missing values empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(fields)
    for r in records:
        writer.writerow(_cell(f, r[f]) for f in fields)
    return out.getvalue()


def _cell(field: str, value: Any) -> str:
    if value is None:
        return ""
    if field in ("amount", "earned", "spent"):
        return f"{value:.2f}"
    return str(value)


def records_table(fields: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """Records as an aligned text table (the CLI's view); kudos with thousands separators."""
    numeric = {"amount", "earned", "spent", "jobs", "megapixelsteps", "tokens", "id", "account_id", "worker_id"}
    rows = [[_text(f, r[f]) for f in fields] for r in records]
    right = frozenset(i for i, f in enumerate(fields) if f in numeric)
    return "\n".join(_table(list(fields), rows, right))


def _text(field: str, value: Any) -> str:
    if value is None:
        return ""
    if field in ("amount", "earned", "spent"):
        return fmt(to_units(value))
    if field == "time":
        return str(value)[:19].replace("T", " ")
    if field == "megapixelsteps":
        return f"{value:,.2f}"
    return str(value)
