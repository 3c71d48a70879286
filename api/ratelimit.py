"""How much a requester may ask: request rates, jobs in the queue, request sizes.

- **Rates**: token buckets per IP and per API key, for submissions and for status polls; a refused
  request is a 429 ``TooManyRequests`` with ``Retry-After``. The buckets live in the API process:
  with ``api_workers`` > 1 (or several hosts) each process limits on its own, so the horde-wide rate
  is up to (processes x rate). That keeps the hot path free of any shared store; a per-IP rate
  worth enforcing exactly belongs in the reverse proxy in front.
- **Queued jobs**: a cap per account on its jobs queued or generating (AI Horde's ``TooManyPrompts``),
  counted from the database at most every ``queued_jobs_refresh_ms`` and, between reads, by the
  jobs this process accepted. So a submission costs no extra query while the count is fresh; the
  price is a cap that each OTHER process's recent submissions can overshoot by one refresh window.
- **Sizes**: prompt length, pixels, steps, n, source images (400 with an rc), and the request body
  (``BodyLimit``, 413 before the body is read).
- **Client IP**: the socket's peer, or X-Forwarded-For when that peer is a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from api.errors import HordeError, TooManyPrompts, TooManyRequests
from api.jobs import CLAIMED, QUEUED
from api.tables import jobs
from config import Settings

Clock = Callable[[], float]

# --- token buckets ----------------------------------------------------------------------------------


@dataclass
class TokenBuckets:
    """One bucket per key: ``burst`` tokens, refilled at ``rate`` per second; a request takes one.

    ``rate`` 0 means no limit. Full buckets are forgotten (they hold no information), so memory
    follows the keys active in the last burst/rate seconds, not every IP ever seen.
    """

    rate: float
    burst: int
    clock: Clock = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (tokens, at)
    _next_prune: float = 0.0

    def take(self, key: str, cost: float = 1.0) -> float:
        """0 when the request may go; otherwise the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate
        self._buckets[key] = (tokens - cost, now)
        if now >= self._next_prune:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items() if now - at < refill}
        self._next_prune = now + max(1.0, refill)


class RateLimits:
    """The API's buckets: submissions and polls, each per IP and per key (the anonymous account has its own)."""

    def __init__(self, settings: Settings, clock: Clock = time.monotonic) -> None:
        s = settings
        self.submit_ip = TokenBuckets(s.submit_rate_per_ip, s.submit_burst_per_ip, clock)
        self.submit_key = TokenBuckets(s.submit_rate_per_key, s.submit_burst_per_key, clock)
        self.submit_anonymous = TokenBuckets(s.submit_rate_anonymous, s.submit_burst_anonymous, clock)
        self.poll_ip = TokenBuckets(s.poll_rate_per_ip, s.poll_burst_per_ip, clock)
        self.poll_key = TokenBuckets(s.poll_rate_per_key, s.poll_burst_per_key, clock)

    def submission_from(self, ip: str) -> None:
        _check(self.submit_ip.take(ip), f"Too many submissions from {ip}")

    def submission_by(self, account_id: int, *, anonymous: bool) -> None:
        if anonymous:
            _check(self.submit_anonymous.take(""), "Too many anonymous submissions (all anonymous clients "
                                                   "share one limit; register for a key of your own)")
        else:
            _check(self.submit_key.take(str(account_id)), "Too many submissions with this API key")

    def poll(self, ip: str, apikey: str | None) -> None:
        _check(self.poll_ip.take(ip), f"Too many status requests from {ip}")
        if apikey:  # the raw header: validating it would cost a lookup per poll; the IP bucket bounds forgeries
            _check(self.poll_key.take(apikey), "Too many status requests with this API key")


def _check(wait: float, what: str) -> None:
    if wait > 0:
        raise TooManyRequests(f"{what}. Retry in {wait:.1f} s.", retry_after=wait)


# --- the client's IP --------------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies if p.strip())


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The socket's peer; if it is a trusted proxy, the right-most X-Forwarded-For entry that is not one.

    Right to left because each proxy appends what it saw: entries left of the first untrusted hop
    are whatever the client chose to send.
    """
    address = peer or "unknown"
    if not forwarded_for or not _within(address, trusted):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not hop:
            continue
        address = hop[:64]  # ip_timeouts.ip and moderation_log.ip hold 64 characters
        if not _within(hop, trusted):
            break
    return address


# --- jobs in the queue --------------------------------------------------------------------------------


class QueuedJobs:
    """Per-account count of queued and claimed jobs, for the cap; see the module's docstring."""

    def __init__(self, engine: AsyncEngine, *, per_user: int, anonymous: int, refresh_ms: int,
                 clock: Clock = time.monotonic) -> None:
        self._engine = engine
        self._per_user = per_user
        self._anonymous = anonymous
        self._refresh = refresh_ms / 1000
        self._clock = clock
        self._counts: dict[int, tuple[int, float]] = {}  # account -> (jobs, read at)

    def cap(self, *, anonymous: bool) -> int:
        return self._anonymous if anonymous else self._per_user

    async def reserve(self, account_id: int, jobs_wanted: int, *, anonymous: bool) -> None:
        """Count ``jobs_wanted`` more jobs for the account, or raise TooManyPrompts if over its cap."""
        cap = self.cap(anonymous=anonymous)
        if cap <= 0:
            return
        if jobs_wanted > cap:
            raise TooManyPrompts(f"This request has {jobs_wanted} jobs, more than the {cap} an account may queue.")
        now = self._clock()
        count, read_at = self._counts.get(account_id, (0, float("-inf")))
        if now - read_at >= self._refresh:
            count = await self._read(account_id)
            self._forget_stale(now)
            self._counts[account_id] = (count, now)
        # Re-read the entry: concurrent submissions may have counted theirs while we awaited.
        count, read_at = self._counts[account_id]
        if count + jobs_wanted > cap:
            raise TooManyPrompts(f"You have {count} jobs queued or generating; at most {cap} at once. "
                                 "Wait for some to finish.")
        self._counts[account_id] = (count + jobs_wanted, read_at)

    async def _read(self, account_id: int) -> int:
        query = (sa.select(sa.func.count()).select_from(jobs)
                 .where(jobs.c.user_id == account_id, jobs.c.state.in_((QUEUED, CLAIMED))))
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    def _forget_stale(self, now: float) -> None:
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if now - v[1] < self._refresh}


# --- request sizes ------------------------------------------------------------------------------------


def check_image_request(*, prompt: str, width: int, height: int, steps: int, n: int,
                        sources: Iterable[str | None], settings: Settings) -> None:
    """400 with an rc for an image request over the configured sizes."""
    check_prompt(prompt, settings.max_prompt_chars)
    if width * height > settings.max_image_pixels:
        raise HordeError(f"{width}x{height} is {width * height} pixels; this horde generates at most "
                         f"{settings.max_image_pixels}.", rc="InvalidSize")
    if steps > settings.max_image_steps:
        raise HordeError(f"{steps} steps; this horde allows at most {settings.max_image_steps}.", rc="TooManySteps")
    check_n(n, settings)
    for source in sources:
        if source is not None and base64_bytes(source) > settings.max_source_image_bytes:
            raise HordeError(f"A source image or mask is over {settings.max_source_image_bytes} bytes.",
                             rc="SourceImageSizeExceeded")


def check_text_request(*, prompt: str, n: int, settings: Settings) -> None:
    check_prompt(prompt, settings.max_text_prompt_chars)
    check_n(n, settings)


def check_prompt(prompt: str, limit: int) -> None:
    if len(prompt) > limit:
        raise HordeError(f"The prompt has {len(prompt)} characters; at most {limit}.", rc="InvalidPromptSize")


def check_n(n: int, settings: Settings) -> None:
    if n > settings.max_generations_per_request:
        raise HordeError(f"n is {n}; at most {settings.max_generations_per_request} per request.",
                         rc="TooManyGenerations")


def base64_bytes(value: str) -> int:
    """Decoded size of a base64 string, without decoding it."""
    return len(value) * 3 // 4 - value[-2:].count("=")


# --- the request body ---------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 ``PayloadTooLarge`` and is never read past the limit.

    A declared Content-Length is checked before anything is read (the server enforces that the
    body is no longer); a chunked body is read up to the limit here and handed on. Requests within
    the limit pay one header scan.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None:
            if length > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"message": f"The request body is over {self.max_bytes} bytes.",
                           "rc": "PayloadTooLarge"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
