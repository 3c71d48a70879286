"""``horde api``: serve the HTTP API with its claims, results and reconciler services."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from cli.logs import uvicorn_log_config

from broker.amqp import connect_sync
from broker.errors import BrokerUnavailable

from config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to listen on (default: HORDE_API_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: HORDE_API_PORT, 7001)")
    parser.add_argument("--workers", type=int, help="uvicorn worker processes (default: HORDE_API_WORKERS, 1)")


def app_factory():  # type: ignore[no-untyped-def]
    """Entry point of each uvicorn worker process: settings are read once, here."""
    from api.app import create_app

    return create_app(Settings())


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:  # say it in one line now rather than in a start-up traceback from each worker process
        connect_sync(settings.rabbitmq_url, name="horde-api-check").close()
    except BrokerUnavailable as exc:
        print(f"horde api: {exc}", file=sys.stderr)
        return 1
    workers = args.workers or settings.api_workers
    # Each uvicorn worker process reads its settings again: hand the flags over through them.
    if args.host:
        os.environ["HORDE_API_HOST"] = args.host
    if args.port:
        os.environ["HORDE_API_PORT"] = str(args.port)
    uvicorn.run(
        "api.command:app_factory",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        workers=workers if workers > 1 else None,
        # X-Forwarded-For counts only from HORDE_TRUSTED_PROXIES (api/ratelimit.client_ip), never
        # because uvicorn trusts localhost by default.
        proxy_headers=False,
        log_level=settings.log_level.lower(),
        # uvicorn's own config would drop the horde's lines in worker processes (and never write JSON)
        log_config=uvicorn_log_config(settings.log_level, "horde-api", settings.log_format),
        access_log=False,
        lifespan="on",
    )
    return 0
