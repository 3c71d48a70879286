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
    for noisy in ("aio_pika", "aiormq", "pika", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
