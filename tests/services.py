"""Real services for the tests: a fresh PostgreSQL database and a fresh RabbitMQ vhost.

Nothing here is faked. If PostgreSQL or RabbitMQ (with its management plugin) is not reachable,
the fixtures fail loudly: CI starts them (.ci/run), a developer starts them once (README).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pika
import psycopg2
import sqlalchemy as sa
from psycopg2 import sql

import migrations
from api.jobs import QUEUED
from api.tables import ANONYMOUS_USER_ID, jobs

PG_ADMIN_URL = os.environ.get("HORDE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_AMQP = os.environ.get("HORDE_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
RABBIT_MGMT = os.environ.get("HORDE_TEST_RABBITMQ_MANAGEMENT", "http://127.0.0.1:15672")
RABBIT_ADMIN = ("guest", "guest")


def _pg_base() -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0]


def create_database(prefix: str = "horde_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    return f"{_pg_base()}/{name}"


@contextlib.contextmanager
def migrated_database(kind: str = "postgresql", sqlite_dir: Path | None = None, *,
                      prefix: str = "horde_test") -> Iterator[str]:
    """A fresh database at the latest migration: PostgreSQL, dropped afterwards, or with ``kind``
    "sqlite" a file in ``sqlite_dir``."""
    url = f"sqlite:///{sqlite_dir / 'horde.db'}" if kind == "sqlite" and sqlite_dir else create_database(prefix)
    try:
        migrations.upgrade(url)
        yield url
    finally:
        if not url.startswith("sqlite"):
            drop_database(url)


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


def create_vhost(prefix: str = "horde-test") -> str:
    """A fresh vhost with full permissions for the admin user; returns its AMQP URL."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=10) as http:
        http.put(f"/api/vhosts/{quote(vhost, safe='')}").raise_for_status()
        http.put(
            f"/api/permissions/{quote(vhost, safe='')}/{RABBIT_ADMIN[0]}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()
    return f"{RABBIT_AMQP}/{quote(vhost, safe='')}"


def delete_vhost(amqp_url: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=10) as http:
        http.delete(f"/api/vhosts/{vhost}")


def purge_queue(amqp_url: str, queue: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=10) as http:
        http.delete(f"/api/queues/{vhost}/{quote(queue, safe='')}/contents").raise_for_status()


def queue_depth(amqp_url: str, queue: str) -> int:
    """Ready messages, read at once with a passive declare (management stats lag by seconds)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


async def insert_queued(engine: Any, jobs_: Sequence[tuple[int, datetime]]) -> list[str]:
    """Queued jobs of (tier, created_at), published when created; their ids in order."""
    rows = [{"id": str(uuid.uuid4()), "request_id": str(uuid.uuid4()), "user_id": ANONYMOUS_USER_ID, "kind": "image",
             "models": ["tiny"], "payload": {}, "tier": tier, "price": 1, "state": QUEUED, "attempts": 0,
             "created_at": created_at, "published_at": created_at} for tier, created_at in jobs_]
    async with engine.begin() as conn:
        await conn.execute(sa.insert(jobs), rows)
    return [row["id"] for row in rows]
