"""Late results: remember the lease a job was taken back from.

- ``jobs.expired_lease_id`` / ``jobs.expired_worker_id``: set when a job goes back to the queue
  from a lease (it expired, or its holder reported a fault). A completion quoting them comes from
  the worker that held the job, late, not from a forger: accepted if nobody has taken the job
  since, ignored without a strike if somebody has.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("expired_lease_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("expired_worker_id", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("expired_worker_id")
        batch.drop_column("expired_lease_id")
