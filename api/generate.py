"""Image generation endpoints of AI Horde API v2: submit, check, status, cancel."""

from __future__ import annotations

import base64
import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from api import job_store
from api.deps import HordeDep, PollLimit, SubmitterDep
from api.errors import HordeError, RequestNotFound, ServiceUnavailable, UnknownModel
from api.jobs import DONE, QUEUED, new_image_jobs, source_processing, status_counts
from api.ratelimit import check_image_request
from api.schemas import (
    AsyncAccepted,
    DryRun,
    ErrorBody,
    ImageGenerateRequest,
    ImageGeneration,
    RequestStatusCheck,
    RequestStatusStable,
)
from api.state import Horde
from config import ModelKind
from config.database import utcnow
from ledger.pricing import image_kudos
from ledger.units import to_kudos, to_units

router = APIRouter(prefix="/api/v2/generate", tags=["generate"])

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 429, 503)}


def serving_models(requested: list[str], kind: ModelKind, h: Horde) -> list[str]:
    """The models that may serve a request: those named (all known ``kind`` models), or every ``kind`` model."""
    if not requested:
        return h.models.names(kind)
    unknown = [m for m in requested if (spec := h.models.get(m)) is None or spec.kind != kind]
    if unknown:
        raise UnknownModel(f"Unknown {kind.value} model(s): {', '.join(map(repr, unknown))}. "
                           "See /api/v2/status/models.")
    return list(dict.fromkeys(requested))


def image_models(requested: list[str], h: Horde) -> list[str]:
    return serving_models(requested, ModelKind.image, h)


def capable_models(models: list[str], processing: str, h: Horde) -> list[str]:
    """The models that can do ``processing``: inpainting models serve inpainting only. A request
    no named model can do is refused now rather than left for a worker that will never come."""
    capable = [m for m in models if processing == "inpainting" or not h.models.get(m).inpainting]
    if not capable:
        raise HordeError(f"None of the models {', '.join(map(repr, models))} can do {processing}: "
                         "inpainting models only inpaint.", rc="UnsupportedSourceProcessing")
    return capable


def price(body: ImageGenerateRequest, models: list[str], h: Horde) -> float:
    """Per image; a request naming several models is priced for the costliest baseline among them."""
    p = body.params
    processing = source_processing(body)
    return max(image_kudos(width=p.width, height=p.height, steps=p.steps, baseline=h.models.get(m).baseline,
                           img2img=processing == "img2img", inpainting=processing == "inpainting")
               for m in models)


@router.post("/async", status_code=202, responses={200: {"model": DryRun}, **ERRORS}, response_model=AsyncAccepted,
             response_model_exclude_none=True)
async def submit(body: ImageGenerateRequest, h: HordeDep, who: SubmitterDep) -> AsyncAccepted | JSONResponse:
    """Queue an image request (one job per image). 202 means stored and confirmed by the broker."""
    account, p = who.account, body.params
    check_image_request(prompt=body.prompt, width=p.width, height=p.height, steps=p.steps, n=p.n,
                        sources=(body.source_image, body.source_mask), settings=h.settings)
    await who.screen(body.prompt, kind="image", models=body.models)
    models = capable_models(image_models(body.models, h), source_processing(body), h)
    each = price(body, models, h)
    if body.dry_run:
        return JSONResponse({"kudos": round(each * body.params.n, 2)}, status_code=200)
    await who.reserve(body.params.n)
    tier = await h.priority.tier(account)
    request_id, new_jobs = new_image_jobs(body, user_id=account.id, models=models, tier=tier,
                                          price_units=to_units(each), now=utcnow())
    await h.intake.submit(new_jobs)
    return AsyncAccepted(id=request_id, kudos=round(each * body.params.n, 2))


def _known_form(request_id: str) -> None:
    """Request ids are UUIDs: anything else is no request (and never reaches the database)."""
    try:
        uuid.UUID(request_id)
    except ValueError:
        raise RequestNotFound(f"No request with id {request_id[:100]!r}.") from None


async def _check(request_id: str, h: Horde) -> tuple[RequestStatusCheck, list]:
    _known_form(request_id)
    try:
        async with h.engine.connect() as conn:
            rows = await job_store.request_jobs(conn, request_id)
            if not rows:
                raise RequestNotFound(f"No request with id {request_id}.")
            counts = status_counts([(r.state, r.attempts, r.price) for r in rows])
            first_queued = next((r for r in rows if r.state == QUEUED), None)
        position = 0
        if first_queued is not None:
            position = await h.positions.position(first_queued.tier, first_queued.created_at)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("The database is unavailable. Retry shortly.", rc="DatabaseUnavailable") from exc
    models = list(rows[0].models)
    workers = h.reconciler.workers_for(models)
    per_job = h.results.average_seconds
    wait = (position + counts.waiting + counts.processing) * per_job / max(1, workers)
    check = RequestStatusCheck(
        finished=counts.finished, processing=counts.processing, restarted=counts.restarted,
        waiting=counts.waiting, done=counts.done, faulted=counts.faulted, wait_time=round(wait),
        queue_position=position, kudos=to_kudos(counts.kudos_units),
        is_possible=counts.done or h.reconciler.is_possible(models),
    )
    return check, rows


@router.get("/check/{request_id}", response_model=RequestStatusCheck, responses=ERRORS, dependencies=[PollLimit])
async def check(request_id: str, h: HordeDep) -> RequestStatusCheck:
    """Progress without the images: cheap enough to poll."""
    status, _ = await _check(request_id, h)
    return status


async def _status(request_id: str, h: Horde) -> RequestStatusStable:
    status, rows = await _check(request_id, h)
    if rows[0].kind != "image":  # a text request: /v2/generate/text/status has it
        raise RequestNotFound(f"No image request with id {request_id}.")
    finished = [r for r in rows if r.state == DONE]
    names = await h.workers.by_id({r.worker_id for r in finished})
    generations = []
    for row in finished:
        data = h.store.get(row.result_path)
        worker = names.get(row.worker_id)
        generations.append(ImageGeneration(
            img=base64.b64encode(data or b"").decode("ascii"), seed=row.seed or "", id=row.id,
            censored=row.censored, model=row.model or "", state="censored" if row.censored else "ok",
            worker_id=str(row.worker_id), worker_name=worker.name if worker else "",
            gen_metadata=[{"type": "censorship", "value": "nsfw"}] if row.censored else [],
        ))
    return RequestStatusStable(**status.model_dump(), generations=generations)


@router.get("/status/{request_id}", response_model=RequestStatusStable, responses=ERRORS, dependencies=[PollLimit])
async def status(request_id: str, h: HordeDep) -> RequestStatusStable:
    """Progress with every finished image (base64 WebP)."""
    return await _status(request_id, h)


@router.delete("/status/{request_id}", response_model=RequestStatusStable, responses=ERRORS)
async def cancel(request_id: str, h: HordeDep) -> RequestStatusStable:
    """Cancel what has not started; images already generating finish, are returned and are paid."""
    _known_form(request_id)
    try:
        async with h.engine.begin() as conn:
            await job_store.cancel(conn, request_id=request_id, kind="image", now=utcnow())
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("The database is unavailable. Retry shortly.", rc="DatabaseUnavailable") from exc
    return await _status(request_id, h)
