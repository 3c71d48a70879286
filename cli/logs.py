"""Logging for every horde process: one line per event, with the process name."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("aio_pika", "aiormq", "httpx", "uvicorn.access", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The AMQP clients log every failed connection attempt with a traceback; the horde reports
    # such failures itself, in one line that says what to do.
    for chatty in ("pika", "aiormq.connection"):
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
