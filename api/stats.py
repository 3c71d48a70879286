"""SQL expressions over the jobs table shared by the status, users and workers endpoints."""

from __future__ import annotations

import sqlalchemy as sa

from api.tables import jobs


def megapixelsteps() -> sa.ColumnElement[float]:
    """An image job's work: width x height x steps / 10^6, from its stored parameters."""
    params = jobs.c.payload["params"]
    return (sa.func.coalesce(params["width"].as_float(), 0) * sa.func.coalesce(params["height"].as_float(), 0)
            * sa.func.coalesce(params["steps"].as_float(), 0) / 1_000_000)


def work() -> sa.ColumnElement[float]:
    """A job's work: megapixelsteps for an image, requested tokens (``max_length``) for text."""
    return sa.case((jobs.c.kind == "text", sa.func.coalesce(jobs.c.payload["params"]["max_length"].as_float(), 0)),
                   else_=megapixelsteps())


def generation_seconds(dialect: str) -> sa.ColumnElement[float]:
    """Seconds from a job's claim to its completion."""
    if dialect == "postgresql":
        return sa.func.extract("epoch", jobs.c.finished_at - jobs.c.claimed_at)
    return (sa.func.julianday(jobs.c.finished_at) - sa.func.julianday(jobs.c.claimed_at)) * 86400.0
