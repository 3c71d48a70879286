"""Admin reports on the ledger: a readable summary and a reconciliation of its invariants.

Both only read. ``reconcile`` returns descriptions of drift, empty when the ledger is sound:

1. all balances, system accounts included, sum to zero (every posting sums to zero);
2. the users' balances sum to minted - burned (minted = -balance(MINT), burned = balance(BURN));
3. every balance equals the sum of its account's entries (the projection matches the entries),
   and no entry names an account that is neither a user nor a system account;
4. every posting group (``job:<id>``, ``grant:<id>``, …; see ``ledger.book``) sums to zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Table, func, select

from config.database import as_utc
from ledger.book import SYSTEM_ACCOUNTS, group_of
from ledger.tables import BURN_ACCOUNT, MINT_ACCOUNT, balances, entries

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
