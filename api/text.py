"""Text generation endpoints of AI Horde API v2 (the KoboldAI side): submit, status, cancel.

Text jobs go through the same path as images: stored, published to the model's priority queue,
claimed by a worker, completed through ``horde.results`` and settled by the ledger. A request for
``n`` texts is ``n`` jobs. As on AI Horde there is no ``/check`` for text: clients poll
``/status``, which is light (texts are small).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from api import job_store
from api.deps import HordeDep, PollLimit, SubmitterDep
from api.errors import RequestNotFound, ServiceUnavailable, UnknownModel
from api.generate import _check as check_request
from api.generate import _known_form as known_form
from api.generate import serving_models
from api.jobs import DONE, new_text_jobs
from api.ratelimit import check_text_request
from api.schemas import AsyncAccepted, DryRun, ErrorBody, RequestStatusKobold, TextGenerateRequest, TextGeneration
from api.state import Horde
from config import ModelKind
from config.database import utcnow
from ledger.pricing import request_kudos, text_kudos
from ledger.units import to_units

router = APIRouter(prefix="/api/v2/generate/text", tags=["generate text"])

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 429, 503)}


def text_models(requested: list[str], h: Horde) -> list[str]:
    return serving_models(requested, ModelKind.text, h)


def parameters_b(models: list[str], h: Horde) -> dict[str, float]:
    return {m: h.models.get(m).parameters_b for m in models}  # type: ignore[union-attr]


def quote(body: TextGenerateRequest, sizes: dict[str, float]) -> float:
    """Per text: ``max_length`` tokens (the most it can cost) on the largest model named."""
    p = body.params
    return text_kudos(tokens=p.max_length, parameters_b=max(sizes.values(), default=0.0),
                      max_context_length=p.max_context_length)


@router.post("/async", status_code=202, responses={200: {"model": DryRun}, **ERRORS}, response_model=AsyncAccepted,
             response_model_exclude_none=True)
async def submit(body: TextGenerateRequest, h: HordeDep, who: SubmitterDep) -> AsyncAccepted | JSONResponse:
    """Queue a text request (one job per text). 202 means stored and confirmed by the broker."""
    account = who.account
    check_text_request(prompt=body.prompt, n=body.params.n, settings=h.settings)
    await who.screen(body.prompt, kind="text", models=body.models)
    models = text_models(body.models, h)
    if not models:
        raise UnknownModel("This horde serves no text model.", rc="NoValidModels")
    sizes = parameters_b(models, h)
    each = quote(body, sizes)
    if body.dry_run:
        return JSONResponse({"kudos": request_kudos(each, body.params.n)}, status_code=200)
    await who.reserve(body.params.n)
    tier = await h.priority.tier(account)
    request_id, new_jobs = new_text_jobs(body, user_id=account.id, models=models, tier=tier,
                                         price_units=to_units(each), parameters_b=sizes, now=utcnow())
    await h.intake.submit(new_jobs)
    return AsyncAccepted(id=request_id, kudos=request_kudos(each, body.params.n))


async def _status(request_id: str, h: Horde) -> RequestStatusKobold:
    status, rows = await check_request(request_id, h)
    if rows[0].kind != "text":
        raise RequestNotFound(f"No text request with id {request_id}.")
    finished = [r for r in rows if r.state == DONE]
    names = await h.workers.by_id({r.worker_id for r in finished})
    generations = []
    for row in finished:
        data = h.store.get(row.result_path) or b""
        worker = names.get(row.worker_id)
        generations.append(TextGeneration(
            text=data.decode("utf-8", "replace"), seed=_seed(row.seed), id=row.id, model=row.model or "",
            state="censored" if row.censored else "ok", worker_id=str(row.worker_id),
            worker_name=worker.name if worker else "",
        ))
    return RequestStatusKobold(**status.model_dump(), generations=generations)


def _seed(seed: str | None) -> int:
    return int(seed) if seed and seed.isdecimal() else 0


@router.get("/status/{request_id}", response_model=RequestStatusKobold, responses=ERRORS, dependencies=[PollLimit])
async def status(request_id: str, h: HordeDep) -> RequestStatusKobold:
    """Progress with every finished text."""
    return await _status(request_id, h)


@router.delete("/status/{request_id}", response_model=RequestStatusKobold, responses=ERRORS)
async def cancel(request_id: str, h: HordeDep) -> RequestStatusKobold:
    """Cancel what has not started; texts already generating finish, are returned and are paid."""
    known_form(request_id)
    await _status(request_id, h)  # 404 for an unknown or image request, before changing anything
    try:
        async with h.engine.begin() as conn:
            await job_store.cancel(conn, request_id=request_id, kind="text", now=utcnow())
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("The database is unavailable. Retry shortly.", rc="DatabaseUnavailable") from exc
    return await _status(request_id, h)
