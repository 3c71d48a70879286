"""Driving a running horde from tests: accounts, workers, HTTP calls and ledger checks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa

from api.accounts import Account, create_user, create_worker
from api.tables import jobs
from broker.amqp import amqp_user
from config import Settings
from config.database import make_sync_engine, utcnow
from ledger.book import balance, grant
from ledger.tables import entries


@dataclass(frozen=True)
class User:
    account: Account
    apikey: str

    @property
    def id(self) -> int:
        return self.account.id


class HordeClient:
    """A running horde (API and ledger processes) seen from outside: HTTP plus the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_sync_engine(settings.resolved_database_url)
        self.http = httpx.Client(base_url=f"http://{settings.api_host}:{settings.api_port}", timeout=30)

    def close(self) -> None:
        self.http.close()
        self.engine.dispose()

    def user(self, alias: str, kudos: float = 0) -> User:
        with self.engine.begin() as conn:
            account, apikey = create_user(conn, alias, pepper=self.settings.apikey_pepper)
            if kudos:
                grant(conn, account.id, kudos, reason="test funds", now=utcnow())
        return User(account, apikey)

    def register_worker(self, name: str, owner: User) -> None:
        with self.engine.begin() as conn:
            create_worker(conn, name, owner=owner.account, amqp_user=amqp_user(self.settings.rabbitmq_url))

    def submit(self, user: User | None, **body: Any) -> str:
        response = self.http.post("/api/v2/generate/async", json=body,
                                  headers={"apikey": user.apikey if user else "0000000000"})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait_done(self, request_id: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            check = self.http.get(f"/api/v2/generate/check/{request_id}").json()
            if check["done"] or check["faulted"]:
                return self.http.get(f"/api/v2/generate/status/{request_id}").json()
            time.sleep(0.2)
        raise AssertionError(f"request {request_id} not done after {timeout}s: {check}")

    def balance(self, user: User) -> float:
        with self.engine.connect() as conn:
            return balance(conn, user.id)

    def wait_balance(self, user: User, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abs(self.balance(user) - expected) < 0.005:
                return
            time.sleep(0.1)
        raise AssertionError(f"balance of {user.account.username} is {self.balance(user)}, expected {expected}")

    def job_rows(self, request_id: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(jobs).where(jobs.c.request_id == request_id)))

    def ledger_entries(self, job_id: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(entries).where(entries.c.job_id == job_id)))

    def count_jobs(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one()
