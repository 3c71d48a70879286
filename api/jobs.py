"""Jobs as pure data: states, leases, turning a request into job rows and messages, and status.

A request for ``n`` images becomes ``n`` jobs sharing a ``request_id``; each job moves
``queued -> claimed -> done | faulted`` (or ``cancelled``) through conditional updates elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.schemas import ImageGenerateRequest, TextGenerateRequest
from broker.messages import ImageParams, JobMessage, TextParams
from ledger.pricing import megapixelsteps

QUEUED, CLAIMED, DONE, FAULTED, CANCELLED = "queued", "claimed", "done", "faulted", "cancelled"
FINAL_STATES = frozenset({DONE, FAULTED, CANCELLED})


def split_prompt(prompt: str) -> tuple[str, str]:
    """AI Horde puts the negative prompt after ``###``."""
    positive, _, negative = prompt.partition("###")
    return positive.strip(), negative.strip()


def lease_seconds(*, width: int, height: int, steps: int, base: float, per_step: float, minimum: float) -> float:
    """How long a worker may hold a job: as AI Horde's TTL (30 s + 2 s per step per 512x512, at least
    150 s), with the constants from settings."""
    return max(minimum, base + per_step * steps * (width * height) / (512 * 512))


#: A text job's lease counts one "step" per this many tokens (AI Horde gives text a fixed 150 s).
TOKENS_PER_LEASE_STEP = 4


def job_lease_seconds(kind: str, params: dict[str, Any], *, base: float, per_step: float, minimum: float) -> float:
    """The lease of a job from its stored params: image size and steps, or text length."""
    if kind == "text":
        return max(minimum, base + per_step * params["max_length"] / TOKENS_PER_LEASE_STEP)
    return lease_seconds(width=params["width"], height=params["height"], steps=params["steps"], base=base,
                         per_step=per_step, minimum=minimum)


def source_processing(request: ImageGenerateRequest) -> str:
    """txt2img, img2img or inpainting (outpainting is inpainting of the transparent pixels)."""
    if request.source_image is None:
        return "txt2img"
    return "img2img" if request.source_processing == "img2img" else "inpainting"


@dataclass(frozen=True)
class NewJob:
    row: dict[str, Any]
    message: JobMessage


def new_image_jobs(request: ImageGenerateRequest, *, user_id: int, models: list[str], tier: int,
                   price_units: int, now: datetime) -> tuple[str, list[NewJob]]:
    """The rows to insert and the messages to publish for one image request."""
    request_id = str(uuid.uuid4())
    positive, negative = split_prompt(request.prompt)
    p = request.params
    params = ImageParams(width=p.width, height=p.height, steps=p.steps, cfg_scale=p.cfg_scale,
                         sampler_name=p.sampler_name, karras=p.karras, seed=p.seed, clip_skip=p.clip_skip,
                         denoising_strength=p.denoising_strength)
    payload = {"prompt": positive, "negative_prompt": negative, "params": params.model_dump(),
               "nsfw": request.nsfw, "censor_nsfw": request.censor_nsfw, "trusted_workers": request.trusted_workers}
    processing = source_processing(request)
    if processing != "txt2img":  # base64 as sent: the row and the message carry the same text
        payload.update(source_processing=processing, source_image=request.source_image,
                       source_mask=request.source_mask)
    jobs = []
    for _ in range(p.n):
        job_id = str(uuid.uuid4())
        row = {"id": job_id, "request_id": request_id, "user_id": user_id, "kind": "image", "models": models,
               "payload": payload, "tier": tier, "price": price_units, "state": QUEUED, "attempts": 0,
               "created_at": now, "published_at": now}
        jobs.append(NewJob(row, job_message(row)))
    return request_id, jobs


def new_text_jobs(request: TextGenerateRequest, *, user_id: int, models: list[str], tier: int, price_units: int,
                  parameters_b: dict[str, float], now: datetime) -> tuple[str, list[NewJob]]:
    """The rows and messages for one text request: ``n`` jobs; with a seed, job i gets seed + i
    (the same seed n times would give the same text n times).

    ``parameters_b`` (model -> billions of parameters) is kept in the payload so the job can be
    settled on the text it returns, priced for the model that served it.
    """
    request_id = str(uuid.uuid4())
    p = request.params
    jobs = []
    for i in range(p.n):
        params = TextParams(max_length=p.max_length, max_context_length=p.max_context_length,
                            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, rep_pen=p.rep_pen,
                            stop_sequence=p.stop_sequence, seed=None if p.seed is None else (p.seed + i) % 2**63)
        payload = {"prompt": request.prompt, "negative_prompt": "", "params": params.model_dump(), "nsfw": True,
                   "censor_nsfw": False, "parameters_b": parameters_b, "trusted_workers": request.trusted_workers}
        row = {"id": str(uuid.uuid4()), "request_id": request_id, "user_id": user_id, "kind": "text",
               "models": models, "payload": payload, "tier": tier, "price": price_units, "state": QUEUED,
               "attempts": 0, "created_at": now, "published_at": now}
        jobs.append(NewJob(row, job_message(row)))
    return request_id, jobs


def job_message(row: Any) -> JobMessage:
    """The wire message for a job row (a mapping or a SQLAlchemy Row)."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    payload = get("payload")
    params_class = TextParams if get("kind") == "text" else ImageParams
    return JobMessage(
        job_id=get("id"), request_id=get("request_id"), kind=get("kind"), models=list(get("models")),
        prompt=payload["prompt"], negative_prompt=payload["negative_prompt"],
        params=params_class(**payload["params"]), nsfw=payload["nsfw"], censor_nsfw=payload["censor_nsfw"],
        tier=get("tier"), attempt=get("attempts") or 0, created_at=get("created_at"),
        source_processing=payload.get("source_processing", "txt2img"), source_image=payload.get("source_image"),
        source_mask=payload.get("source_mask"), trusted_workers=bool(payload.get("trusted_workers")),
    )


def job_megapixelsteps(payload: dict[str, Any]) -> float:
    params = payload["params"]
    if "width" not in params:  # a text job
        return 0.0
    return megapixelsteps(width=params["width"], height=params["height"], steps=params["steps"])


@dataclass(frozen=True)
class StatusCounts:
    finished: int
    processing: int
    waiting: int
    restarted: int
    faulted: bool
    done: bool
    kudos_units: int


def status_counts(states: Sequence[tuple[str, int, int]]) -> StatusCounts:
    """Aggregate ``(state, attempts, price)`` of a request's jobs into AI Horde's status counters."""
    finished = sum(1 for s, _, _ in states if s == DONE)
    processing = sum(1 for s, _, _ in states if s == CLAIMED)
    waiting = sum(1 for s, _, _ in states if s == QUEUED)
    faulted = any(s == FAULTED for s, _, _ in states)
    return StatusCounts(
        finished=finished,
        processing=processing,
        waiting=waiting,
        restarted=sum(a for _, a, _ in states),
        faulted=faulted,
        done=not faulted and processing == 0 and waiting == 0,
        kudos_units=sum(p for s, _, p in states if s == DONE),
    )
