"""The economy: work units on ledger entries (reports), worker uptime streaks (rewards).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries") as batch:
        batch.add_column(sa.Column("megapixelsteps", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("tokens", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_ledger_entries_created", "ledger_entries", ["created_at"])
    op.create_table(
        "worker_uptime",
        sa.Column("worker_id", sa.Integer, sa.ForeignKey("workers.id"), primary_key=True, autoincrement=False),
        sa.Column("streak_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paid_intervals", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("worker_uptime")
    op.drop_index("ix_ledger_entries_created", "ledger_entries")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_column("tokens")
        batch.drop_column("megapixelsteps")
