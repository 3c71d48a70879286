"""The dispatcher: count the leases a worker holds.

- ``ix_jobs_worker_state``: the dispatcher offers a worker a job only while it holds fewer than
  ``HORDE_MAX_LEASES_PER_WORKER`` live leases, counted in the grant's transaction; an index range
  instead of every job the worker ever did.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_worker_state", "jobs", ["worker_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_worker_state", table_name="jobs")
