"""FastAPI dependencies shared by the routers: the horde's state, the requesting account, roles."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from api.accounts import Account
from api.roles import Forbidden
from api.state import Horde


async def horde(request: Request) -> Horde:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its threadpool, and that hop
    # on every request cost the accept path 10-18% of its throughput (docs/benchmarks.md).
    return request.app.state.horde


HordeDep = Annotated[Horde, Depends(horde)]


async def requester(request: Request, apikey: Annotated[str | None, Header()] = None) -> Account:
    """The account of the ``apikey`` header; anonymous without one; 401 for an unknown key."""
    return await (await horde(request)).auth.account(apikey)


RequesterDep = Annotated[Account, Depends(requester)]


def require(role: str):  # type: ignore[no-untyped-def]
    """A dependency giving the requesting account if it holds ``role`` (admins hold every role)."""

    async def check(h: HordeDep, account: RequesterDep) -> Account:
        held = await h.roles.roles(account)
        if role not in held and "admin" not in held:
            raise Forbidden(f"This needs the {role} role.", rc=f"Not{role.capitalize()}")
        return account

    return Depends(check)


AdminDep = Annotated[Account, require("admin")]
