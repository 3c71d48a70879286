"""Logging for every horde process: one line per event, with the process name.

Two formats: plain text (the default), or one JSON object per line with ``HORDE_LOG_FORMAT=json``
for log collectors. In JSON, every line about a job carries its id in a ``job_id`` field, so one
query follows a job through the API, the claims and results services and the worker. The horde's
code names the job at the start of such lines (``job <id>: …`` in the API's services, ``job=<id> …``
from the worker's ``JobLog``), or passes ``extra={"job_id": …}``; the formatter reads either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
_NOISY = ("aio_pika", "aiormq", "httpx", "uvicorn.access", "alembic.runtime.plugins")
# The AMQP clients log every failed connection attempt with a traceback; the horde reports such
# failures itself, in one line that says what to do.
_CHATTY = ("pika", "aiormq.connection")
#: A job named at the start of a line: "job 1b9d…: leased to w1" or "job=1b9d… received …".
_JOB_AT_START = re.compile(r"^job[ =]([0-9A-Za-z][0-9A-Za-z_-]{0,63})\b")


def setup_logging(level: str, process: str, log_format: str | None = None) -> None:
    """Log to stderr at ``level``; ``log_format`` is "text" or "json" (default: HORDE_LOG_FORMAT, else text)."""
    log_format = _resolve(log_format)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(_text_format(process)))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in _CHATTY:
        logging.getLogger(chatty).setLevel(logging.CRITICAL)


def _text_format(process: str) -> str:
    return f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"


def _resolve(log_format: str | None) -> str:
    log_format = (log_format or os.environ.get("HORDE_LOG_FORMAT") or "text").lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    return log_format


def uvicorn_log_config(level: str, process: str, log_format: str | None = None) -> dict[str, Any]:
    """The same logging as ``setup_logging``, as a ``logging.config`` dict for ``uvicorn.run(log_config=…)``.

    uvicorn applies its log config in every worker process it starts; with ``api_workers`` > 1
    those processes never run ``setup_logging``, so without this their own lines (the API's
    services: claims, results, reconciler) have no handler and uvicorn's lines keep its format.
    """
    log_format = _resolve(log_format)
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter", "process": process} if log_format == "json"
        else {"format": _text_format(process)}
    )
    quiet = {name: {"level": "WARNING"} for name in _NOISY}
    quiet.update({name: {"level": "CRITICAL"} for name in _CHATTY})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"horde": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "horde", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            **quiet,
            # uvicorn's loggers come with handlers of their own in its default config: replace them.
            "uvicorn": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
        },
    }


def job_id_of(record: logging.LogRecord, message: str) -> str | None:
    """The job a log line is about, if any: ``extra={"job_id": …}`` or named at the line's start."""
    explicit = getattr(record, "job_id", None)
    if explicit:
        return str(explicit)
    match = _JOB_AT_START.match(message)
    return match.group(1) if match else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, process, logger, message, and
    ``job_id`` on lines about a job; ``exception`` holds a traceback when there is one."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self._process,
            "pid": record.process,
            "logger": record.name,
            "message": message,
        }
        job_id = job_id_of(record, message)
        if job_id is not None:
            line["job_id"] = job_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["exception"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)
