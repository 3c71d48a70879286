"""FastAPI dependencies shared by the routers: the horde's state, the requesting account, roles."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from api.accounts import Account
from api.moderation import Moderation
from api.prompt_guard import PromptGuard
from api.ratelimit import Network, QueuedJobs, RateLimits, client_ip
from api.roles import Forbidden
from api.state import Horde
from api.tables import ANONYMOUS_APIKEY
from config import Settings


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


# --- requesters (issue 6): where a request comes from, and the limits it meets ---------------------


@dataclass
class Guards:
    """One API process's defences against abusive requesters, built once at start-up (api.app)."""

    settings: Settings
    limits: RateLimits
    queued: QueuedJobs
    moderation: Moderation
    prompts: PromptGuard
    proxies: tuple[Network, ...]

    def ip(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        return client_ip(peer, request.headers.get("x-forwarded-for"), self.proxies)


@dataclass(frozen=True)
class Submitter:
    """Who submits, from which IP: past the IP timeout and rate limits, with the checks left to do."""

    account: Account
    ip: str
    guards: Guards

    async def screen(self, prompt: str, *, kind: str, models: list[str]) -> None:
        """400 CorruptPrompt (the account flagged, the IP timed out, the request logged) for a corrupt prompt."""
        if kind == "text" and not self.guards.settings.screen_text_prompts:
            return
        screen = functools.partial(self.guards.prompts.corrupt, prompt, negative_after_hashes=kind == "image")
        # ~6 us for a usual prompt; a long text prompt (70 ms at 500 000 characters) goes to a
        # thread, so the event loop keeps serving others meanwhile.
        match = screen() if len(prompt) < 20_000 else await asyncio.to_thread(screen)
        if match is not None:
            raise await self.guards.moderation.corrupt_prompt(match, account=self.account, ip=self.ip,
                                                              prompt=prompt, kind=kind, models=models)

    async def reserve(self, jobs: int) -> None:
        """429 TooManyPrompts when ``jobs`` more would put the account over its cap of queued jobs."""
        await self.guards.queued.reserve(self.account.id, jobs, anonymous=self.account.anonymous)


async def submitter(request: Request, apikey: Annotated[str | None, Header()] = None) -> Submitter:
    guards: Guards = request.app.state.guards
    ip = guards.ip(request)
    await guards.moderation.check_ip(ip)
    guards.limits.submission_from(ip)  # before the key lookup: floods of made-up keys stop here
    account = await requester(request, apikey)
    guards.limits.submission_by(account.id, anonymous=account.anonymous)
    return Submitter(account, ip, guards)


SubmitterDep = Annotated[Submitter, Depends(submitter)]


async def poll_limit(request: Request, apikey: Annotated[str | None, Header()] = None) -> None:
    guards: Guards = request.app.state.guards
    guards.limits.poll(guards.ip(request), None if apikey in (None, ANONYMOUS_APIKEY) else apikey)


#: For status routes: ``dependencies=[PollLimit]``.
PollLimit = Depends(poll_limit)
