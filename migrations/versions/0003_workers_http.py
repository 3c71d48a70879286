"""Workers as AI Horde shows them, and HTTP workers: what a worker serves and when it was last seen.

AMQP workers and HTTP workers (``/generate/pop``) share the ``workers`` table; an HTTP worker's
``amqp_user`` is the sentinel ``http:`` (no broker user can be named so: the horde creates worker
users of ``[a-z0-9-]``), so no AMQP message can ever be accepted as its. The columns here are
what ``/workers`` reports. ``ix_jobs_worker_id`` serves the per-worker statistics.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("kind", sa.String(10), nullable=False, server_default="image"))
        batch.add_column(sa.Column("models", sa.JSON, nullable=True))
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("bridge_agent", sa.String(1000), nullable=False, server_default=""))
        batch.add_column(sa.Column("max_pixels", sa.Integer, nullable=True))
        batch.add_column(sa.Column("nsfw", sa.Boolean, nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("threads", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("info", sa.String(1000), nullable=False, server_default=""))
    op.create_index("ix_jobs_worker_id", "jobs", ["worker_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_worker_id", "jobs")
    with op.batch_alter_table("workers") as batch:
        for column in ("info", "threads", "nsfw", "max_pixels", "bridge_agent", "last_seen_at", "models", "kind"):
            batch.drop_column(column)
