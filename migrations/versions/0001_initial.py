"""The spine: users, workers, jobs, and the ledger (entries, balances, inbox).

Revision ID: 0001
Revises:
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("alias", sa.String(100), nullable=False),
        sa.Column("apikey_hash", sa.String(64), unique=True, nullable=True),
        sa.Column("roles", sa.String(200), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # The shared anonymous account: id 0, no stored key (0000000000 is recognised by value).
    op.bulk_insert(users, [{"id": 0, "alias": "Anonymous", "apikey_hash": None, "roles": "",
                            "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), 1, false)")
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), unique=True, nullable=False),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("amqp_user", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("tier", sa.Integer, nullable=False),
        sa.Column("price", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("worker_id", sa.Integer, nullable=True),
        sa.Column("lease_id", sa.String(36), nullable=True),
        sa.Column("lease_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("seed", sa.String(40), nullable=True),
        sa.Column("censored", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("result_path", sa.Text, nullable=True),
        sa.Column("fault_reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_jobs_request_id", "jobs", ["request_id"])
    op.create_index("ix_jobs_state_created", "jobs", ["state", "created_at"])

    op.create_table(
        "ledger_entries",
        sa.Column("id", BIGINT_ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(120), unique=True, nullable=False),
        sa.Column("account_id", sa.Integer, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("worker_id", sa.Integer, nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("memo", sa.String(300), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ledger_entries_account_created", "ledger_entries", ["account_id", "created_at"])
    op.create_table(
        "balances",
        sa.Column("account_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "ledger_inbox",
        sa.Column("message_id", sa.String(120), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("ledger_inbox", "balances", "ledger_entries", "jobs", "workers", "users"):
        op.drop_table(table)
