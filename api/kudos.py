"""``POST /api/v2/kudos/transfer``: a user gives kudos to another, as on AI Horde.

Refusals are 400 ``KudosValidationError``-style answers with AI Horde's return codes. A user may
give only what it has: the payer's balance row is locked while the transfer is checked and
posted, so two concurrent transfers cannot both spend the same kudos (job debits may still take
a balance below zero; a transfer never does). An ``Idempotency-Key`` header makes a retried
transfer count once.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Header
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from api.accounts import Account, find_user
from api.deps import HordeDep, RequesterDep
from api.errors import KudosValidationError
from api.schemas import ErrorBody
from config.database import utcnow
from ledger.book import balance_units, kudos_units, transfer
from ledger.tables import balances, entries

router = APIRouter(prefix="/api/v2/kudos", tags=["kudos"])

ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 403)}


class KudosTransfer(BaseModel):
    username: str = Field(min_length=1, max_length=200, description="The receiver, as alias#id.")
    amount: float = Field(100, allow_inf_nan=False, le=1e12, description="Kudos to give; hundredths are kept.")


class KudosTransferred(BaseModel):
    transferred: float


def _refuse(message: str, rc: str) -> KudosValidationError:
    return KudosValidationError(message, rc=rc)


def _transfer(conn: Connection, source: Account, target_name: str, amount: float, key: str | None) -> float:
    """Check and post one transfer inside the caller's transaction; the amount moved."""
    target = find_user(conn, target_name) if "#" in target_name and target_name.isprintable() else None
    if target is None:
        raise _refuse(f"No user {target_name!r}: give the receiver as alias#id.", "InvalidTargetUsername")
    if target.anonymous:
        raise _refuse("Kudos sent to the anonymous account would be lost; transfer refused.", "KudosTransferToAnon")
    if target.id == source.id:
        raise _refuse("You cannot send kudos to yourself.", "KudosTransferToSelf")
    ledger_key = f"{source.id}-{key}" if key else None
    if ledger_key and conn.execute(
            sa.select(entries.c.id).where(entries.c.key == f"transfer:{ledger_key}:debit")).first():
        return amount  # a retry of a transfer that was already made
    # Lock both balance rows in account order (the ledger's lock order), then check the payer's.
    conn.execute(sa.select(balances.c.account_id).where(balances.c.account_id.in_(sorted({source.id, target.id})))
                 .order_by(balances.c.account_id).with_for_update()).all()
    if balance_units(conn, source.id) < kudos_units(amount):
        raise _refuse("Not enough kudos.", "KudosTransferNotEnough")
    transfer(conn, source.id, target.id, amount, memo=f"{source.username} to {target.username}",
             key=ledger_key, now=utcnow())
    return amount


@router.post("/transfer", response_model=KudosTransferred, responses=ERRORS)
async def transfer_kudos(body: KudosTransfer, h: HordeDep, account: RequesterDep,
                         idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> KudosTransferred:
    """Give kudos to another user. Refused: from the anonymous account, to yourself, to an unknown
    user, amounts of zero or less, more than you have."""
    if account.anonymous:
        raise _refuse("The anonymous account cannot transfer kudos.", "KudosTransferFromAnon")
    if body.amount < 0:
        raise _refuse("A transfer amount cannot be negative.", "NegativeKudosTransfer")
    amount = round(body.amount, 2)
    if amount <= 0:
        raise _refuse("The transfer amount must be positive.", "InvalidKudosTransferAmount")
    key = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40] if idempotency_key else None
    async with h.engine.begin() as conn:
        moved = await conn.run_sync(lambda c: _transfer(c, account, body.username.strip(), amount, key))
    return KudosTransferred(transferred=moved)
