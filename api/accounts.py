"""Accounts: API keys (stored only as peppered hashes), users, workers, and key lookup."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.errors import InvalidAPIKey
from broker.topology import worker_of
from api.tables import ANONYMOUS_APIKEY, ANONYMOUS_USER_ID, HTTP_WORKER_AMQP_USER, users, workers
from broker.topology import WORKER_NAME_RE
from config.database import utcnow

APIKEY_LENGTH = 22  # what AI Horde issues, and what horde-sdk accepts
MAX_USER_ID = 2**31 - 1  # users.id is an INTEGER
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Account:
    id: int
    alias: str

    @property
    def anonymous(self) -> bool:
        return self.id == ANONYMOUS_USER_ID

    @property
    def username(self) -> str:
        return f"{self.alias}#{self.id}"


ANONYMOUS = Account(ANONYMOUS_USER_ID, "Anonymous")


@dataclass(frozen=True)
class WorkerRecord:
    id: int
    name: str
    owner_id: int
    amqp_user: str

    @property
    def is_http(self) -> bool:
        """A worker that polls over HTTP (/generate/pop): no AMQP message is ever accepted as its."""
        return self.amqp_user == HTTP_WORKER_AMQP_USER


def new_apikey() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(APIKEY_LENGTH))


def hash_apikey(apikey: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), apikey.encode(), hashlib.sha256).hexdigest()


def create_user(conn: Connection, alias: str, *, pepper: str) -> tuple[Account, str]:
    """Create a user; returns it with its API key, which is shown once and stored only hashed."""
    alias = alias.strip()
    if not alias or len(alias) > 100:
        raise ValueError("a username has 1 to 100 characters")
    apikey = new_apikey()
    user_id = conn.execute(
        sa.insert(users)
        .values(alias=alias, apikey_hash=hash_apikey(apikey, pepper), created_at=utcnow())
        .returning(users.c.id)
    ).scalar_one()
    return Account(user_id, alias), apikey


def find_user(conn: Connection, name: str) -> Account | None:
    """By ``alias#id``, by id, or by alias when it is unique."""
    alias, _, ident = name.rpartition("#")
    if ident.isascii() and ident.isdigit():
        if int(ident) > MAX_USER_ID:
            return None
        row = conn.execute(sa.select(users.c.id, users.c.alias).where(users.c.id == int(ident))).first()
        return Account(row.id, row.alias) if row and (not alias or alias == row.alias) else None
    rows = conn.execute(sa.select(users.c.id, users.c.alias).where(users.c.alias == name)).all()
    return Account(rows[0].id, rows[0].alias) if len(rows) == 1 else None


def create_worker(conn: Connection, name: str, *, owner: Account, amqp_user: str) -> WorkerRecord:
    if not WORKER_NAME_RE.match(name):
        raise ValueError("a worker name is 2-63 characters of a-z, 0-9 and '-', starting with a letter or digit")
    if amqp_user.startswith(HTTP_WORKER_AMQP_USER):
        raise ValueError(f"AMQP user names starting with {HTTP_WORKER_AMQP_USER!r} are reserved for HTTP workers")
    return _insert_worker(conn, name, owner=owner, amqp_user=amqp_user)


HTTP_WORKER_NAME_MAX = 63


def http_worker_name(name: str) -> str:
    """An HTTP worker's name as AI Horde workers send it (spaces, capitals allowed), checked."""
    name = name.strip()
    if not 0 < len(name) <= HTTP_WORKER_NAME_MAX or not name.isprintable():
        raise ValueError(f"a worker name has 1 to {HTTP_WORKER_NAME_MAX} printable characters")
    return name


def create_http_worker(conn: Connection, name: str, *, owner: Account, kind: str = "image") -> WorkerRecord:
    """Register a worker that polls over HTTP; AI Horde registers one at its first pop."""
    return _insert_worker(conn, http_worker_name(name), owner=owner, amqp_user=HTTP_WORKER_AMQP_USER, kind=kind)


def _insert_worker(conn: Connection, name: str, *, owner: Account, amqp_user: str, **extra: object) -> WorkerRecord:
    worker_id = conn.execute(
        sa.insert(workers)
        .values(name=name, owner_id=owner.id, amqp_user=amqp_user, created_at=utcnow(), **extra)
        .returning(workers.c.id)
    ).scalar_one()
    return WorkerRecord(worker_id, name, owner.id, amqp_user)


def account_names(conn: Connection) -> dict[int, str]:
    return {row.id: f"{row.alias}#{row.id}" for row in conn.execute(sa.select(users.c.id, users.c.alias))}


class Authenticator:
    """Resolves ``apikey`` headers to accounts, caching hits so the hot path skips the database."""

    def __init__(self, engine: AsyncEngine, *, pepper: str, ttl: float = 60.0) -> None:
        self._engine = engine
        self._pepper = pepper
        self._ttl = ttl
        self._cache: dict[str, tuple[float, Account]] = {}

    async def account(self, apikey: str | None) -> Account:
        if not apikey or apikey == ANONYMOUS_APIKEY:
            return ANONYMOUS
        digest = hash_apikey(apikey, self._pepper)
        hit = self._cache.get(digest)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        async with self._engine.connect() as conn:
            row = (await conn.execute(
                sa.select(users.c.id, users.c.alias).where(users.c.apikey_hash == digest)
            )).first()
        if row is None:
            raise InvalidAPIKey("No user matches this API key. Use 0000000000 for anonymous requests.")
        account = Account(row.id, row.alias)
        self._cache[digest] = (time.monotonic() + self._ttl, account)
        return account


class WorkerDirectory:
    """Worker records by name, cached: the claims and results services look one up per message."""

    def __init__(self, engine: AsyncEngine, *, ttl: float = 30.0) -> None:
        self._engine = engine
        self._ttl = ttl
        self._cache: dict[str, tuple[float, WorkerRecord | None]] = {}

    async def get(self, name: str, *, fresh: bool = False) -> WorkerRecord | None:
        hit = self._cache.get(name)
        if hit and hit[0] > time.monotonic() and not fresh:
            return hit[1]
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(workers).where(workers.c.name == name))).first()
        record = WorkerRecord(row.id, row.name, row.owner_id, row.amqp_user) if row else None
        # Unknown names are cached briefly too, so a flood of forged names costs one query each few seconds.
        self._cache[name] = (time.monotonic() + (self._ttl if record else 2.0), record)
        return record

    async def sender(self, name: str, *, user_id: str | None, routing_key: str) -> WorkerRecord | None:
        """The registered worker that sent a message, if the name in its body, the ``user_id`` the
        broker validated and the routing key's last segment all agree; else None (forged)."""
        worker = await self.get(name)
        if worker is None or user_id != worker.amqp_user or worker_of(routing_key) != name:
            return None
        return worker

    def remember(self, record: WorkerRecord) -> None:
        """Cache a worker just registered here (its name may be cached as unknown for a moment)."""
        self._cache[record.name] = (time.monotonic() + self._ttl, record)

    async def by_id(self, worker_ids: set[int]) -> dict[int, WorkerRecord]:
        if not worker_ids:
            return {}
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(workers).where(workers.c.id.in_(worker_ids)))
            return {r.id: WorkerRecord(r.id, r.name, r.owner_id, r.amqp_user) for r in rows}


# --- untrusted workers (issue 6): who may get jobs, and what a misbehaving worker is charged with ---


async def unavailability(conn: AsyncConnection, worker_id: int) -> str | None:
    """Why the worker gets no jobs now (suspended, paused, in maintenance), or None. Read in the
    caller's transaction, never cached: a pause applies to the very next claim."""
    row = (await conn.execute(sa.select(workers.c.suspended_at, workers.c.paused, workers.c.maintenance)
                              .where(workers.c.id == worker_id))).first()
    if row is None or row.suspended_at is not None:
        return "suspended"
    if row.paused:
        return "paused"
    return "in maintenance" if row.maintenance else None
