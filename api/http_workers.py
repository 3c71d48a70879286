"""AI Horde's worker endpoints: ``POST /api/v2/generate/pop`` and ``/generate/submit`` (image),
``/generate/text/pop`` and ``/generate/text/submit`` (text). api.bridge does the work.

Bodies and answers have AI Horde's shapes (``PopInputStable``/``PopInputKobold``,
``GenerationPayloadStable``/``GenerationPayloadKobold``, ``SubmitInput*``); unknown fields that
workers send are accepted and ignored. A pop leases one job (``amount`` is accepted, one job is
answered). With nothing to do it answers ``{"id": null, "ids": [], "payload": {}, "skipped": {...}}``.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.accounts import Account
from api.bridge import ImageOffer, Popped, TextOffer, lease_ttl, seed_text
from api.deps import HordeDep, RequesterDep
from api.errors import AnonForbidden
from api.schemas import ErrorBody

router = APIRouter(prefix="/api/v2/generate", tags=["workers"])

ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 503)}
DEFAULT_MAX_PIXELS = 512 * 512


class PopInputStable(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=100, description="The worker's name; a new one registers it.")
    models: list[str] = Field(default_factory=list, max_length=500)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=0, le=2**31 - 1)
    nsfw: bool = True
    blacklist: list[str] = Field(default_factory=list, max_length=1000)
    amount: int = Field(1, ge=1, le=20, description="Accepted; one job is answered per pop.")
    threads: int = Field(1, ge=1, le=50)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    allow_img2img: bool = True
    allow_painting: bool = True
    require_upfront_kudos: bool = False
    priority_usernames: list[str] = Field(default_factory=list, max_length=100)

    def offer(self) -> ImageOffer:
        models = tuple(m for m in self.models if 0 < len(m) <= 200 and "\x00" not in m)
        return ImageOffer(models=models, max_pixels=self.max_pixels, nsfw=self.nsfw, blacklist=tuple(self.blacklist),
                          threads=self.threads, bridge_agent=self.bridge_agent.replace("\x00", ""),
                          allow_img2img=self.allow_img2img, allow_painting=self.allow_painting)


class PayloadStable(BaseModel):
    """The job's parameters as AI Horde workers read them (``ddim_steps``, ``n_iter``, ``seed`` as text)."""

    prompt: str | None = None
    width: int | None = None
    height: int | None = None
    ddim_steps: int | None = None
    n_iter: int | None = None
    seed: str | None = None
    sampler_name: str | None = None
    cfg_scale: float | None = None
    karras: bool | None = None
    clip_skip: int | None = None
    denoising_strength: float | None = None
    hires_fix: bool | None = None
    tiling: bool | None = None
    post_processing: list[str] | None = None
    use_nsfw_censor: bool | None = None


class GenerationPayloadStable(BaseModel):
    id: str | None = Field(description="The job to submit for; null when there is none.")
    ids: list[str]
    payload: PayloadStable
    skipped: dict[str, int] = Field(description="Jobs passed over, by reason (max_pixels, nsfw, ...).")
    model: str | None = None
    ttl: int | None = Field(None, description="Seconds until the lease expires.")
    source_processing: str | None = None
    source_image: str | None = Field(None, description="base64 (img2img, inpainting).")
    source_mask: str | None = None


class SubmitInputStable(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=100)
    generation: str = Field("", description="The image, base64 (WebP, PNG or JPEG).")
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    seed: str = "0"
    censored: bool = False
    gen_metadata: list[dict[str, Any]] | None = Field(None, max_length=50)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class GenerationSubmitted(BaseModel):
    reward: float


def _worker_owner(account: Account) -> Account:
    if account.anonymous:
        raise AnonForbidden("Anonymous workers are not allowed: use your own API key.", rc="AnonForbiddenWorker")
    return account


def _answer(popped: Popped | None, skipped: dict[str, int]) -> GenerationPayloadStable:
    if popped is None:
        return GenerationPayloadStable(id=None, ids=[], payload=PayloadStable(), skipped=skipped)
    job, params = popped.job, popped.job.params
    prompt = f"{job.prompt} ### {job.negative_prompt}" if job.negative_prompt else job.prompt
    payload = PayloadStable(
        prompt=prompt, width=params.width, height=params.height, ddim_steps=params.steps,  # type: ignore[union-attr]
        n_iter=1, seed=seed_text(params.seed), sampler_name=params.sampler_name,  # type: ignore[union-attr]
        cfg_scale=params.cfg_scale, karras=params.karras, clip_skip=params.clip_skip,  # type: ignore[union-attr]
        hires_fix=False, tiling=False, post_processing=[], use_nsfw_censor=job.censor_nsfw)
    if params.denoising_strength is not None:  # type: ignore[union-attr]
        payload.denoising_strength = params.denoising_strength  # type: ignore[union-attr]
    answer = GenerationPayloadStable(id=job.job_id, ids=[job.job_id], payload=payload, skipped=skipped,
                                     model=popped.model, ttl=lease_ttl(popped.reply.lease_deadline),
                                     source_processing=getattr(job, "source_processing", "txt2img"))
    for field in ("source_image", "source_mask"):
        data = getattr(job, field, None)
        if data is not None:
            setattr(answer, field, base64.b64encode(data).decode("ascii"))
    return answer


@router.post("/pop", response_model=GenerationPayloadStable, response_model_exclude_unset=True, responses=ERRORS)
async def pop(body: PopInputStable, h: HordeDep, account: RequesterDep) -> GenerationPayloadStable:
    """An HTTP worker asks for an image job from the models it serves (its owner's ``apikey``)."""
    owner = _worker_owner(account)
    worker = await h.bridge.worker(owner, body.name)
    offer = body.offer()
    await h.bridge.touch(worker, offer)
    popped, skipped = await h.bridge.pop(worker, offer)
    return _answer(popped, dict(skipped))


@router.post("/submit", response_model=GenerationSubmitted, responses=ERRORS)
async def submit(body: SubmitInputStable, h: HordeDep, account: RequesterDep) -> GenerationSubmitted:
    """An HTTP worker hands in the image of a job it popped; the answer is the kudos it earned."""
    owner = _worker_owner(account)
    reward = await h.bridge.submit_image(owner, body.id, generation=body.generation, state=body.state,
                                         seed=body.seed, censored=body.censored)
    return GenerationSubmitted(reward=reward)


# --- text ----------------------------------------------------------------------------------------


class PopInputKobold(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=100, description="The worker's name; a new one registers it.")
    models: list[str] = Field(default_factory=list, max_length=500)
    max_length: int = Field(512, ge=1, le=1_000_000, description="Most tokens it generates per job.")
    max_context_length: int = Field(2048, ge=1, le=100_000_000)
    nsfw: bool = True
    blacklist: list[str] = Field(default_factory=list, max_length=1000)
    amount: int = Field(1, ge=1, le=20, description="Accepted; one job is answered per pop.")
    threads: int = Field(1, ge=1, le=50)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    softprompts: list[str] | None = None

    def offer(self) -> TextOffer:
        models = tuple(m for m in self.models if 0 < len(m) <= 200 and "\x00" not in m)
        return TextOffer(models=models, max_length=self.max_length, max_context_length=self.max_context_length,
                         blacklist=tuple(self.blacklist), threads=self.threads, nsfw=self.nsfw,
                         bridge_agent=self.bridge_agent.replace("\x00", ""))


class PayloadKobold(BaseModel):
    prompt: str | None = None
    n: int | None = None
    max_length: int | None = None
    max_context_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    rep_pen: float | None = None
    stop_sequence: list[str] | None = None


class GenerationPayloadKobold(BaseModel):
    id: str | None = Field(description="The job to submit for; null when there is none.")
    ids: list[str]
    payload: PayloadKobold
    skipped: dict[str, int] = Field(description="Jobs passed over, by reason (max_length, ...).")
    model: str | None = None
    softprompt: str | None = None
    ttl: int | None = Field(None, description="Seconds until the lease expires.")


class SubmitInputKobold(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=100)
    generation: str = Field("", max_length=10_000_000, pattern=r"^[^\x00]*$", description="The text.")
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    gen_metadata: list[dict[str, Any]] | None = Field(None, max_length=50)


def _text_answer(popped: Popped | None, skipped: dict[str, int]) -> GenerationPayloadKobold:
    if popped is None:
        return GenerationPayloadKobold(id=None, ids=[], payload=PayloadKobold(), skipped=skipped)
    job, params = popped.job, popped.job.params
    payload = PayloadKobold(
        prompt=job.prompt, n=1, max_length=params.max_length,  # type: ignore[union-attr]
        max_context_length=params.max_context_length, temperature=params.temperature,  # type: ignore[union-attr]
        top_p=params.top_p, top_k=params.top_k, rep_pen=params.rep_pen,  # type: ignore[union-attr]
        stop_sequence=list(params.stop_sequence))  # type: ignore[union-attr]
    return GenerationPayloadKobold(id=job.job_id, ids=[job.job_id], payload=payload, skipped=skipped,
                                   model=popped.model, ttl=lease_ttl(popped.reply.lease_deadline))


@router.post("/text/pop", response_model=GenerationPayloadKobold, response_model_exclude_unset=True,
             responses=ERRORS)
async def text_pop(body: PopInputKobold, h: HordeDep, account: RequesterDep) -> GenerationPayloadKobold:
    """An HTTP worker asks for a text job from the models it serves (its owner's ``apikey``)."""
    owner = _worker_owner(account)
    worker = await h.bridge.worker(owner, body.name, kind="text")
    offer = body.offer()
    await h.bridge.touch(worker, offer)
    popped, skipped = await h.bridge.pop(worker, offer)
    return _text_answer(popped, dict(skipped))


@router.post("/text/submit", response_model=GenerationSubmitted, responses=ERRORS)
async def text_submit(body: SubmitInputKobold, h: HordeDep, account: RequesterDep) -> GenerationSubmitted:
    """An HTTP worker hands in the text of a job it popped; the answer is the kudos it earned."""
    owner = _worker_owner(account)
    reward = await h.bridge.submit_text(owner, body.id, generation=body.generation, state=body.state)
    return GenerationSubmitted(reward=reward)
