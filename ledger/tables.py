"""The ledger's tables: append-only double-entry entries, the balance projection, the inbox.

Amounts are integers in hundredths of a kudo (``ledger.units``) so sums are exact.
Every movement is a set of entries summing to zero; money enters through the MINT account and
leaves through BURN, so ``sum(user balances) == minted - burned`` holds by construction.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Float, Index, Integer, MetaData, String, Table

metadata = MetaData()

#: System accounts; user accounts are the (non-negative) user ids.
MINT_ACCOUNT = -1
BURN_ACCOUNT = -2

entries = Table(
    "ledger_entries",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("key", String(120), unique=True, nullable=False),  # e.g. job:<id>:debit; makes posting idempotent
    Column("account_id", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("kind", String(20), nullable=False),  # generation | admin | transfer | uptime | tax
    Column("job_id", String(36), nullable=True),
    Column("worker_id", Integer, nullable=True),
    Column("model", String(200), nullable=True),
    Column("memo", String(300), nullable=False, server_default=""),
    # The work a generation entry paid for, so reports need no join with the API's job table.
    Column("megapixelsteps", Float, nullable=False, server_default="0"),
    Column("tokens", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_ledger_entries_account_created", "account_id", "created_at"),
    Index("ix_ledger_entries_created", "created_at"),
)

balances = Table(
    "balances",
    metadata,
    Column("account_id", Integer, primary_key=True, autoincrement=False),
    Column("balance", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

inbox = Table(
    "ledger_inbox",
    metadata,
    Column("message_id", String(120), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
)
