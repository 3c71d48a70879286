"""Untrusted volunteers and requesters: worker states, moderation log, IP timeouts, owner priority.

- ``workers``: ``paused`` (by an admin or moderator) and ``maintenance`` (by the owner) workers
  receive no jobs; ``suspended_at``/``suspension_reason`` record an ejection by the broker
  watchdog or a revocation; ``flagged`` marks it for moderators; ``strikes`` counts forged or
  stale completions and other misbehaviour; ``priority_usernames`` lists the users (``alias#id``)
  its owner serves first on it (issue 5).
- ``users.flagged``: an account that sent a corrupt prompt (or was flagged by a moderator).
- ``moderation_log``: what moderators review: corrupt prompts (with the request), ejections,
  forged completions.
- ``ip_timeouts``: IPs timed out after repeated corrupt prompts, with a growing back-off.
- ``dead_letters``: what reached the dead-letter queue (poison messages, dropped jobs), for admins.
- ``ix_jobs_user_state``: a requester's queued jobs, counted for the per-user cap.
- ``ix_jobs_state_tier_created``: a job's queue position as two range counts (tier above, same
  tier and older), instead of filtering every queued job.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("maintenance", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("suspension_reason", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("strikes", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("priority_usernames", sa.JSON, nullable=True))
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "moderation_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("worker_id", sa.Integer, nullable=True),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_moderation_log_created_at", "moderation_log", ["created_at"])
    op.create_table(
        "ip_timeouts",
        sa.Column("ip", sa.String(64), primary_key=True),
        sa.Column("hits", sa.Integer, nullable=False, server_default="0"),
        sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=True),
        sa.Column("type", sa.String(100), nullable=True),
        sa.Column("user_id", sa.String(100), nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("action", sa.String(40), nullable=False, server_default=""),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])
    op.create_index("ix_jobs_user_state", "jobs", ["user_id", "state"])
    op.create_index("ix_jobs_state_tier_created", "jobs", ["state", "tier", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_tier_created", "jobs")
    op.drop_index("ix_jobs_user_state", "jobs")
    op.drop_index("ix_dead_letters_received_at", "dead_letters")
    op.drop_table("dead_letters")
    op.drop_table("ip_timeouts")
    op.drop_index("ix_moderation_log_created_at", "moderation_log")
    op.drop_table("moderation_log")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("flagged")
    with op.batch_alter_table("workers") as batch:
        for column in ("priority_usernames", "strikes", "flagged", "suspension_reason", "suspended_at",
                       "maintenance", "paused"):
            batch.drop_column(column)
