"""The API's tables (SQLAlchemy Core): accounts, workers and jobs. Migrations create them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, Column, ColumnElement, DateTime, ForeignKey, Index, Integer, MetaData, String,
    Table, Text,
)

metadata = MetaData()

#: The shared anonymous account (apikey 0000000000) has this id; it is created by the first migration.
ANONYMOUS_USER_ID = 0
ANONYMOUS_APIKEY = "0000000000"

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alias", String(100), nullable=False),
    Column("apikey_hash", String(64), unique=True, nullable=True),
    Column("roles", String(200), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("flagged", Boolean, nullable=False, server_default="0"),  # migration 0004
)

workers = Table(
    "workers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), unique=True, nullable=False),
    Column("owner_id", Integer, ForeignKey("users.id"), nullable=False),
    # The AMQP user the worker logs in as: its events must carry this user_id.
    Column("amqp_user", String(100), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # What /workers shows (migration 0003): HTTP workers report it with each pop.
    Column("kind", String(10), nullable=False, server_default="image"),
    Column("models", JSON, nullable=True),
    Column("last_seen_at", DateTime(timezone=True), nullable=True),
    Column("bridge_agent", String(1000), nullable=False, server_default=""),
    Column("max_pixels", Integer, nullable=True),
    Column("nsfw", Boolean, nullable=False, server_default="1"),
    Column("threads", Integer, nullable=False, server_default="1"),
    Column("info", String(1000), nullable=False, server_default=""),
    # Migration 0004: paused (moderators) and maintenance (owner) workers get no jobs; suspended
    # ones were ejected (watchdog) or revoked; strikes count forged or stale completions.
    Column("paused", Boolean, nullable=False, server_default="0"),
    Column("maintenance", Boolean, nullable=False, server_default="0"),
    Column("suspended_at", DateTime(timezone=True), nullable=True),
    Column("suspension_reason", Text, nullable=False, server_default=""),
    Column("flagged", Boolean, nullable=False, server_default="0"),
    Column("strikes", Integer, nullable=False, server_default="0"),
    Column("priority_usernames", JSON, nullable=True),  # users (alias#id) its owner serves first on it
)

#: ``workers.amqp_user`` of workers that poll over HTTP (/generate/pop): no broker user is named so.
HTTP_WORKER_AMQP_USER = "http:"

# One row per image (or text) to generate: a request with n = 3 is three rows sharing request_id.
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("request_id", String(36), nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("kind", String(10), nullable=False),
    Column("models", JSON, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("tier", Integer, nullable=False),
    Column("price", BigInteger, nullable=False),  # hundredths of a kudo (ledger.units)
    Column("state", String(12), nullable=False),
    Column("model", String(200), nullable=True),  # the model that served it
    Column("worker_id", Integer, nullable=True),
    Column("lease_id", String(36), nullable=True),
    Column("lease_deadline", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("seed", String(40), nullable=True),
    Column("censored", Boolean, nullable=False, server_default="0"),
    Column("result_path", Text, nullable=True),
    Column("fault_reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # migration 0006: the lease the job was last taken back from, so that its holder's late result
    # is told from a forgery (api/results.py)
    Column("expired_lease_id", String(36), nullable=True),
    Column("expired_worker_id", Integer, nullable=True),
    Index("ix_jobs_request_id", "request_id"),
    Index("ix_jobs_state_created", "state", "created_at"),
    Index("ix_jobs_worker_id", "worker_id"),
    Index("ix_jobs_user_state", "user_id", "state"),  # migration 0004: the per-user cap on queued jobs
    Index("ix_jobs_state_tier_created", "state", "tier", "created_at"),  # migration 0004: queue positions
    Index("ix_jobs_worker_state", "worker_id", "state"),  # migration 0005: leases a worker holds
)


def unindexed(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` as an expression that no index can serve (``state || ''``, ``worker_id + 0``): for
    the other tests of a statement that finds its rows by primary key, so that the planner has only
    the primary key to find them by.

    Why: with statistics taken before the rows they look for existed (a fresh table, a burst of jobs
    since the last ANALYZE, a new worker), PostgreSQL costs ``ix_jobs_state_*`` or
    ``ix_jobs_worker_*`` the same as the primary key for ``id = … AND state = 'queued'`` and may
    pick them, scanning every queued job (or every job of a worker) to update one. The dispatcher's
    lease did: 2.5 ms a lease with a few thousand jobs queued, the costliest statement of
    ``bench/system.py`` (docs/benchmarks.md, tests/test_row_lookups.py)."""
    return column.concat("") if isinstance(column.type, String) else column + 0


# One row per worker: its current streak of continuous uptime, for uptime rewards (api/uptime.py).
worker_uptime = Table(
    "worker_uptime",
    metadata,
    Column("worker_id", Integer, ForeignKey("workers.id"), primary_key=True, autoincrement=False),
    Column("streak_start", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("paid_intervals", Integer, nullable=False, server_default="0"),
)

# What moderators review (migration 0004): corrupt prompts with their request, watchdog ejections,
# forged completions. ``kind`` says which; ``detail`` holds the rest.
moderation_log = Table(
    "moderation_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("user_id", Integer, nullable=True),
    Column("worker_id", Integer, nullable=True),
    Column("ip", String(64), nullable=True),
    Column("detail", JSON, nullable=False),
    Index("ix_moderation_log_created_at", "created_at"),
)

# IPs timed out after repeated corrupt prompts, with a growing back-off (migration 0004).
ip_timeouts = Table(
    "ip_timeouts",
    metadata,
    Column("ip", String(64), primary_key=True),
    Column("hits", Integer, nullable=False, server_default="0"),
    Column("blocked_until", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# What reached the dead-letter queue (migration 0004): poison messages and dropped jobs, for admins.
# ``queue`` is where it was dead-lettered from, ``reason`` RabbitMQ's (rejected, expired, maxlen),
# ``action`` what the horde did with it (recorded, republished).
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("message_id", String(255), nullable=True),
    Column("type", String(100), nullable=True),
    Column("user_id", String(100), nullable=True),
    Column("body", Text, nullable=False),
    Column("action", String(40), nullable=False, server_default=""),
    Index("ix_dead_letters_received_at", "received_at"),
)
