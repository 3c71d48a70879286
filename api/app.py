"""The API process: the FastAPI app and, beside it, the trusted services that own job state.

``create_app(settings)`` builds everything from the one settings object. On start-up the app
declares the topology, then runs the claims and results consumers and the reconciler in its
event loop; on shutdown it stops them before closing connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import admin, compat, dead_letters, generate, metrics, status, text
from api import worker_accounts
from api.accounts import Authenticator, WorkerDirectory
from api.bridge import JobBridge
from api.claims import ClaimsService
from api.dispatcher import Dispatcher
from api.deps import Guards
from api.errors import HordeError
from api.intake import Intake
from api.moderation import Moderation
from api.priority import PriorityDesk
from api.prompt_guard import load_guard
from api.queue_positions import QueuePositions
from api.ratelimit import BodyLimit, QueuedJobs, RateLimits, trusted_networks
from api.owner_priority import PriorityRoutes
from api.reconciler import Reconciler
from api.result_store import ResultStore
from api.results import ResultsService
from api.roles import RoleBook
from api.state import Horde
from api.uptime import UptimeService
from api.watchdog import Watchdog
from broker.amqp import Publisher, amqp_user, connect, declare
from broker.topology import CLAIMS_QUEUE, DEAD_QUEUE, HEARTBEATS_QUEUE, RESULTS_QUEUE, build_topology
from config import Settings, load_model_reference
from config.database import make_async_engine

log = logging.getLogger(__name__)

_HTTP_RCS = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge", 429: "TooManyRequests"}


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="Horde on RabbitMQ",
        version="2.5.0",
        description="A crowdsourced AI generation network, compatible with AI Horde API v2.",
        lifespan=lambda app: _lifespan(app, settings),
    )
    app.include_router(generate.router)
    app.include_router(text.router)
    app.include_router(status.router)
    app.include_router(admin.router)
    app.include_router(worker_accounts.router)
    app.include_router(metrics.router)
    app.include_router(dead_letters.router)
    compat.install(app)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # type: ignore[arg-type]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    models = load_model_reference(settings.model_reference)
    engine = make_async_engine(settings.resolved_database_url)
    connection = await connect(settings.rabbitmq_url, name="horde-api")
    tasks: list[asyncio.Task[None]] = []
    try:
        setup = await connection.channel()
        await declare(setup, build_topology(models.names()))
        await setup.close()
        publisher = await Publisher.open(connection, user_id=amqp_user(settings.rabbitmq_url))
        workers = WorkerDirectory(engine)
        store = ResultStore(settings.resolved_results_dir)
        results = ResultsService(engine, publisher, workers, store, max_attempts=settings.max_attempts)
        roles = RoleBook(engine)
        app.state.worker_accounts = worker_accounts.WorkerAccounts(settings, connection)
        routes = PriorityRoutes(engine)
        claims_channel = await connection.channel()
        claims = ClaimsService(engine, claims_channel, workers, lease_base_seconds=settings.lease_base_seconds,
                               lease_step_seconds=settings.lease_step_seconds,
                               lease_min_seconds=settings.lease_min_seconds, roles=roles, publisher=publisher,
                               routes=routes)
        await _consume(claims_channel, CLAIMS_QUEUE, claims.handle, prefetch=64)
        await _consume(await connection.channel(), RESULTS_QUEUE, results.handle, prefetch=64)
        uptime = UptimeService(engine, publisher, workers, models, interval_seconds=settings.uptime_interval_seconds,
                               stale_seconds=settings.uptime_stale_seconds)
        await _consume(await connection.channel(), HEARTBEATS_QUEUE, uptime.handle, prefetch=32)
        dead = dead_letters.DeadLetterDesk(engine, publisher)
        await _consume(await connection.channel(), DEAD_QUEUE, dead.handle, prefetch=16)
        dispatcher = Dispatcher(
            amqp_url=settings.rabbitmq_url, engine=engine, claims=claims, workers=workers,
            model_kinds={m.name: m.kind for m in models}, hold=settings.dispatch_hold,
            ask_ttl_seconds=3 * settings.ask_refresh_seconds, max_leases=settings.max_leases_per_worker,
            retry_after_seconds=settings.dispatch_retry_after_seconds,
            linger_seconds=settings.dispatch_linger_seconds)
        tasks.append(asyncio.create_task(dispatcher.run()))
        reconciler = Reconciler(engine, publisher, connection, models.names(), max_attempts=settings.max_attempts,
                                republish_after=settings.republish_after_seconds, aging_seconds=settings.aging_seconds,
                                held_per_consumer=settings.dispatch_hold, leads=lambda: dispatcher.leading)
        tasks.append(asyncio.create_task(reconciler.run(settings.reconcile_interval_seconds)))
        if settings.watchdog_interval_seconds > 0:
            tasks.append(asyncio.create_task(Watchdog.from_settings(settings, engine).run(
                settings.watchdog_interval_seconds)))
        app.state.guards = _guards(settings, engine)
        app.state.horde = Horde(
            settings=settings, models=models, engine=engine,
            auth=Authenticator(engine, pepper=settings.apikey_pepper), priority=PriorityDesk(engine),
            intake=Intake(engine, publisher, routes, door=dispatcher), workers=workers, store=store, results=results,
            claims=claims, roles=roles,
            reconciler=reconciler, positions=QueuePositions(engine),
            bridge=JobBridge(engine=engine, connection=connection, claims=claims, results=results, workers=workers,
                             models=models, uptime=uptime),
        )
        log.info("API ready on http://%s:%d", settings.api_host, settings.api_port)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if hasattr(app.state, "worker_accounts"):
            await app.state.worker_accounts.aclose()
        await connection.close()
        await engine.dispose()


def _guards(settings: Settings, engine) -> Guards:  # type: ignore[no-untyped-def]
    """The requester limits of this process (docs/security.md, "Requesters")."""
    return Guards(
        settings=settings, limits=RateLimits(settings),
        queued=QueuedJobs(engine, per_user=settings.max_queued_jobs_per_user,
                          anonymous=settings.max_queued_jobs_anonymous, refresh_ms=settings.queued_jobs_refresh_ms),
        moderation=Moderation(engine, base_seconds=settings.ip_timeout_base_seconds,
                              max_seconds=settings.ip_timeout_max_seconds,
                              refresh_seconds=settings.ip_timeouts_refresh_seconds),
        prompts=load_guard(settings.corrupt_prompt_patterns_file),
        proxies=trusted_networks(settings.trusted_proxies),
    )


async def _consume(channel, queue_name: str, handler, *, prefetch: int) -> None:  # type: ignore[no-untyped-def]
    await channel.set_qos(prefetch_count=prefetch)
    # A passive declare, not get_queue(ensure=False): only declared queues are registered with the
    # robust channel, which re-consumes them after a reconnect (a broker restart).
    queue = await channel.declare_queue(queue_name, passive=True)
    await queue.consume(handler)


def _error(status: int, message: str, rc: str, **extra: object) -> JSONResponse:
    return JSONResponse({"message": message, "rc": rc, **extra}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", "BadRequest"
    if loc == ["prompt"] and first.get("type") in {"missing", "string_too_short"}:
        return "A prompt is required.", "MissingPrompt"
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg', 'invalid')}", "BadRequest"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HordeError)
    async def horde_error(_: Request, exc: HordeError) -> JSONResponse:
        response = _error(exc.status, exc.message, exc.rc)
        response.headers.update(getattr(exc, "headers", {}))  # Retry-After of rate limits and IP timeouts
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, rc = _validation_message(exc)
        errors = {".".join(str(p) for p in e.get("loc", ())): e.get("msg", "") for e in exc.errors()}
        return _error(400, message, rc, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), _HTTP_RCS.get(exc.status_code, "BadRequest"))

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(ConnectionError)
    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # The database went away mid-request (asyncpg's refused connections arrive as plain
        # ConnectionRefusedError): a 503 the client may retry, not a 500 saying the horde is broken.
        log.warning("request failed, database unavailable: %r", exc)
        return _error(503, "The database is unavailable. Retry shortly.", "DatabaseUnavailable")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "Internal server error. It has been logged.", "InternalServerError")
