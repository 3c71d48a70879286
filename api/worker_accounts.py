"""Registering, pausing and deleting AMQP workers over HTTP: ``POST``, ``PUT`` and ``DELETE /api/v2/workers``.

A registered worker gets its own RabbitMQ user (``api.provisioning``): the answer to the
registration carries its ``amqp_url`` with a fresh password, shown this once and stored nowhere
by the horde (RabbitMQ keeps a salted hash). Registration is all or nothing: the row is committed
only once the broker user, its permissions and the worker's own queue exist; if the broker fails,
the user is deleted again and nothing is left.

A paused (moderators), in-maintenance (owner) or deleted worker gets no job three ways: the claims
service refuses its claims (read in the claim's transaction, so at once), its RabbitMQ user may
read no queue and its connections are closed, and an HTTP pop answers nothing. Deleting revokes
the user (its connections close, what it held is requeued) and keeps the row, which jobs reference.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

import aio_pika
import aiormq
import sqlalchemy as sa
from aio_pika.abc import AbstractRobustConnection
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from api.accounts import Account, WorkerRecord, find_user
from api.deps import HordeDep, RequesterDep
from api.errors import (
    AnonForbidden,
    BadRequest,
    Forbidden,
    HordeError,
    ServiceUnavailable,
    UnknownModel,
    WorkerNotFound,
)
from api.provisioning import (
    BrokerAccounts,
    UserExists,
    WorkerGrant,
    amqp_username,
    credentials_url,
    declare_worker_queue,
    settings_grant,
)
from api.schemas import ErrorBody
from api.state import Horde
from api.tables import workers
from broker.errors import BrokerError
from broker.management import Management, vhost_of
from config import ModelKind, Settings
from config.database import utcnow

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v2/workers", tags=["workers"])
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 503)}
MODERATORS = frozenset({"admin", "moderator"})


class NameTaken(HordeError):
    status, rc = 409, "WorkerNameTaken"


class WorkerAccounts:
    """What the endpoints need beside the horde's state: the management API and the trusted
    connection that declares workers' own queues. Built once per API process."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection) -> None:
        self.settings = settings
        self.connection = connection
        self._management = Management(settings.rabbitmq_management_url)
        self.broker = BrokerAccounts(self._management, vhost_of(settings.rabbitmq_url))

    async def aclose(self) -> None:
        await self._management.aclose()

    def grant(self, name: str, models: list[str]) -> WorkerGrant:
        return settings_grant(self.settings, name)

    def provisioned(self, row: Row[Any]) -> bool:
        """Whether the horde made this worker's RabbitMQ user (never true of the horde's own user,
        which development workers share, nor of HTTP workers)."""
        try:
            return row.amqp_user == amqp_username(self.settings.worker_user_prefix, row.name)
        except ValueError:
            return False

    def amqp_url(self, user: str, password: str) -> str:
        return credentials_url(self.settings.worker_amqp_url or self.settings.rabbitmq_url, user, password)


async def worker_accounts(request: Request) -> WorkerAccounts:
    return request.app.state.worker_accounts


AccountsDep = Annotated[WorkerAccounts, Depends(worker_accounts)]


# --- POST: register ----------------------------------------------------------------------------


class WorkerRegistration(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=63, description="2-63 characters of a-z, 0-9 and '-': it names its RabbitMQ user.")
    models: list[str] = Field(min_length=1, max_length=100, description="Models it serves, from the model reference.")
    kind: Literal["image", "text"] = "image"
    info: str = Field("", max_length=1000)
    nsfw: bool = True
    max_pixels: int | None = Field(None, ge=64 * 64, le=2**31 - 1)
    threads: int = Field(1, ge=1, le=50)


class RegisteredWorker(BaseModel):
    id: str
    name: str
    kind: str
    models: list[str]
    amqp_user: str
    amqp_url: str = Field(description="RabbitMQ URL with the worker's credentials: shown only this once.")


@router.post("", status_code=201, response_model=RegisteredWorker, responses=ERRORS)
async def register_worker(body: WorkerRegistration, h: HordeDep, accounts: AccountsDep,
                          account: RequesterDep) -> RegisteredWorker:
    """Register an AMQP worker owned by the caller, with its own least-privilege RabbitMQ user."""
    if account.anonymous:
        raise AnonForbidden("Anonymous users cannot register workers: use your own API key.",
                            rc="AnonForbiddenWorker")
    models = _checked_models(h, body)
    try:
        grant = accounts.grant(body.name, models)
    except ValueError as exc:
        raise BadRequest("A worker name is 2-63 characters of a-z, 0-9 and '-', starting with a letter or digit.",
                         rc="InvalidWorkerName") from exc
    async with h.engine.connect() as conn:
        if (await conn.execute(sa.select(workers.c.id).where(workers.c.name == body.name))).first() is not None:
            raise NameTaken(f"A worker named {body.name!r} exists: pick another name.")
    password, record = await _create(h, accounts, body, models, grant, account)
    h.workers.remember(record)
    log.info("registered worker %s (id %d, AMQP user %s) for %s", record.name, record.id, grant.user, account.username)
    return RegisteredWorker(id=str(record.id), name=record.name, kind=body.kind, models=models, amqp_user=grant.user,
                            amqp_url=accounts.amqp_url(grant.user, password))


def _checked_models(h: Horde, body: WorkerRegistration) -> list[str]:
    models = list(dict.fromkeys(body.models))
    for model in models:
        spec = h.models.get(model)
        if spec is None:
            raise UnknownModel(f"Unknown model {model[:200]!r}: not in the model reference.")
        if spec.kind != ModelKind(body.kind):
            raise UnknownModel(f"Model {model!r} is a {spec.kind.value} model, not {body.kind}.")
    return models


async def _create(h: Horde, accounts: WorkerAccounts, body: WorkerRegistration, models: list[str],
                  grant: WorkerGrant, owner: Account) -> tuple[str, WorkerRecord]:
    """Insert the row and provision the broker in one transaction: committed only if both worked."""
    password: str | None = None
    try:
        async with h.engine.begin() as conn:
            worker_id = (await conn.execute(sa.insert(workers).values(
                name=body.name, owner_id=owner.id, amqp_user=grant.user, created_at=utcnow(), kind=body.kind,
                models=models, info=body.info, nsfw=body.nsfw, max_pixels=body.max_pixels, threads=body.threads,
            ).returning(workers.c.id))).scalar_one()
            password = await accounts.broker.provision(grant)
            await declare_worker_queue(accounts.connection, body.name)
    except (IntegrityError, UserExists) as exc:  # the same name registered meanwhile, or a user not ours
        raise NameTaken(f"A worker named {body.name!r} exists: pick another name.") from exc
    except Exception as exc:
        if password is not None:  # the user exists but the row does not: remove it
            await _undo(accounts, grant.user)
        if isinstance(exc, _BROKER_FAILURES):
            log.error("worker %s not registered: the broker failed: %s", body.name, exc)
            raise ServiceUnavailable("The message broker could not create this worker's account. Retry shortly.",
                                     rc="BrokerUnavailable") from exc
        raise
    return password, WorkerRecord(worker_id, body.name, owner.id, grant.user)


_BROKER_FAILURES = (BrokerError, OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError,
                    aio_pika.exceptions.AMQPException)


async def _undo(accounts: WorkerAccounts, user: str) -> None:
    try:
        await accounts.broker.revoke(user)
    except BrokerError as exc:
        log.error("could not delete RabbitMQ user %s after a failed registration: %s", user, exc)


# --- DELETE: revoke ----------------------------------------------------------------------------


class DeletedWorker(BaseModel):
    deleted_id: str
    deleted_name: str


@router.delete("/{worker_id}", response_model=DeletedWorker, responses=ERRORS)
async def delete_worker(worker_id: str, h: HordeDep, accounts: AccountsDep, account: RequesterDep) -> DeletedWorker:
    """Revoke a worker (its owner, or a moderator): its RabbitMQ user is deleted, which closes its
    connections; the row stays, suspended, since jobs reference it."""
    row = await _worker_row(h, worker_id)
    roles = await h.roles.roles(account)
    if row.owner_id != account.id and not roles & MODERATORS:
        raise Forbidden("Only the worker's owner or a moderator can delete it.", rc="NotOwner")
    if accounts.provisioned(row):
        try:
            await accounts.broker.revoke(row.amqp_user)
        except BrokerError as exc:
            raise ServiceUnavailable("The message broker could not revoke this worker. Retry shortly.",
                                     rc="BrokerUnavailable") from exc
    async with h.engine.begin() as conn:
        await conn.execute(sa.update(workers).where(workers.c.id == row.id, workers.c.suspended_at.is_(None))
                           .values(suspended_at=utcnow(), suspension_reason=f"deleted by {account.username}"))
    log.info("worker %s (id %d) deleted by %s", row.name, row.id, account.username)
    return DeletedWorker(deleted_id=str(row.id), deleted_name=row.name)


async def _worker_row(h: Horde, worker_id: str) -> Row[Any]:
    if not (worker_id.isascii() and worker_id.isdigit()) or len(worker_id) > 9:
        raise WorkerNotFound(f"No worker with id {worker_id[:20]!r}.")
    async with h.engine.connect() as conn:
        row = (await conn.execute(sa.select(workers).where(workers.c.id == int(worker_id)))).first()
    if row is None:
        raise WorkerNotFound(f"No worker with id {worker_id}.")
    return row


# --- PUT: maintenance, pause, info, priority users -----------------------------------------------


class ModifyWorkerInput(BaseModel):
    """AI Horde's ``ModifyWorkerInput``; ``name`` and ``team`` are not supported here."""

    model_config = ConfigDict(extra="ignore")

    maintenance: bool | None = Field(None, description="The owner (or a moderator) takes it out of service.")
    maintenance_msg: str | None = Field(None, max_length=1000, description="Accepted, not shown.")
    paused: bool | None = Field(None, description="Moderators only: it gets no jobs (and no uptime).")
    info: str | None = Field(None, max_length=1000)
    name: str | None = Field(None, description="Not supported: a worker's name is its RabbitMQ user.")
    priority_usernames: list[str] | None = Field(
        None, max_length=100, description="The owner's list of users (alias#id) served first on this worker.")


class ModifyWorker(BaseModel):
    """The fields changed, with their new values (AI Horde's ``ModifyWorker``)."""

    maintenance: bool | None = None
    paused: bool | None = None
    info: str | None = None
    priority_usernames: list[str] | None = None


@router.put("/{worker_id}", response_model=ModifyWorker, response_model_exclude_none=True, responses=ERRORS)
async def modify_worker(worker_id: str, body: ModifyWorkerInput, h: HordeDep, accounts: AccountsDep,
                        account: RequesterDep) -> ModifyWorker:
    """Set maintenance (owner or moderator), paused (moderator), info (owner or moderator) or
    priority_usernames (owner). A worker paused or in maintenance gets no job from the next claim on,
    and its broker connections are closed until it is back in service."""
    if account.anonymous:
        raise AnonForbidden("Anonymous users cannot modify workers.")
    row = await _worker_row(h, worker_id)
    owner = row.owner_id == account.id
    moderator = bool(await h.roles.roles(account) & MODERATORS)
    changes = _allowed_changes(body, owner=owner, moderator=moderator)
    if body.priority_usernames is not None:
        changes["priority_usernames"] = await _existing_users(h, body.priority_usernames)
    if not changes:
        raise BadRequest("Nothing to change: send maintenance, paused, info or priority_usernames.")
    async with h.engine.begin() as conn:
        await conn.execute(sa.update(workers).where(workers.c.id == row.id).values(**changes))
        row = (await conn.execute(sa.select(workers).where(workers.c.id == row.id))).one()
    if ("maintenance" in changes or "paused" in changes) and accounts.provisioned(row) and row.suspended_at is None:
        await _apply_service_state(accounts, row)
    log.info("worker %s (id %d) modified by %s: %s", row.name, row.id, account.username, changes)
    return ModifyWorker(**changes)


def _allowed_changes(body: ModifyWorkerInput, *, owner: bool, moderator: bool) -> dict[str, Any]:
    if body.name is not None:
        raise BadRequest("Renaming a worker is not supported: its name is its RabbitMQ user. Register a new one.")
    if not (owner or moderator):
        raise Forbidden("Only the worker's owner or a moderator can modify it.", rc="NotOwner")
    if body.paused is not None and not moderator:
        raise Forbidden("Only moderators can pause a worker.", rc="NotModerator")
    if body.priority_usernames is not None and not owner:
        raise Forbidden("Only the worker's owner can set its priority users.", rc="NotOwner")
    return {k: v for k, v in (("maintenance", body.maintenance), ("paused", body.paused), ("info", body.info))
            if v is not None}


async def _existing_users(h: Horde, names: list[str]) -> list[str]:
    """``alias#id`` of each user named, as stored; 400 if one does not exist."""
    found: list[str] = []
    async with h.engine.connect() as conn:
        for name in dict.fromkeys(n.strip() for n in names):
            user = await conn.run_sync(lambda c, n=name: find_user(c, n)) if "#" in name else None
            if user is None:
                raise BadRequest(f"No user {name[:100]!r}: priority users are given as alias#id.",
                                 rc="InvalidPriorityUsername")
            found.append(user.username)
    return found


async def _apply_service_state(accounts: WorkerAccounts, row: Row[Any]) -> None:
    """Out of service: read nothing and drop its connections; back in service: its reads again."""
    grant = accounts.grant(row.name, list(row.models or []))
    try:
        if row.paused or row.maintenance:
            await accounts.broker.pause(grant, reason="paused" if row.paused else "in maintenance")
        else:
            await accounts.broker.resume(grant)
    except BrokerError as exc:
        # The claims service already refuses (or grants) by the row; only the broker side lags.
        raise ServiceUnavailable("Saved, but the message broker did not apply it yet: send it again.",
                                 rc="BrokerUnavailable") from exc
