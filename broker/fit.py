"""Whether a job fits a worker: one pure rule shared by the dispatcher (which offers only jobs
that fit) and the worker (which checks again what it was offered)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from broker.messages import Capabilities, JobMessage, ModelOffer


def censor_words_in(text: str, words: Iterable[str]) -> list[str]:
    """The censorlist ``words`` found in ``text`` as whole words, case-insensitively."""
    lowered = text.lower()
    return [w for w in words if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", lowered)]


def must_check(job: JobMessage, *, worker_nsfw: bool, censorlist: Iterable[str]) -> bool:
    """Whether the job's image goes through the safety checker (the negative prompt, which says
    what not to draw, does not count for the censorlist)."""
    return not worker_nsfw or not job.nsfw or job.censor_nsfw or bool(censor_words_in(job.prompt, censorlist))


def refusal(job: JobMessage, model: ModelOffer, caps: Capabilities) -> str | None:
    """Why a worker with ``caps`` must not take ``job`` for ``model`` (None: it can)."""
    if job.kind != model.kind:
        return f"a {job.kind} job for {model.kind} model {model.name!r}"
    if job.kind == "text":
        p = job.text_params
        if p.max_length > caps.max_length:
            return f"max_length {p.max_length} is above this worker's {caps.max_length}"
        if p.max_context_length > caps.max_context_length:
            return f"max_context_length {p.max_context_length} is above this worker's {caps.max_context_length}"
        return _not_requested(job, model)
    ip = job.image_params
    if ip.width * ip.height > caps.max_pixels:
        return f"{ip.width}x{ip.height} is above this worker's max_pixels {caps.max_pixels}"
    if job.source_processing == "img2img" and not caps.allow_img2img:
        return "this worker does not do img2img"
    if job.source_processing == "inpainting" and not caps.allow_painting:
        return "this worker does not do inpainting"
    if job.source_processing != "inpainting" and model.inpainting_only:
        return f"{model.name!r} is an inpainting model: it cannot do {job.source_processing}"
    if not caps.can_censor and must_check(job, worker_nsfw=caps.nsfw, censorlist=caps.censorlist):
        return "the job must be censored and this worker has no safety checker"
    return _not_requested(job, model)


def _not_requested(job: JobMessage, model: ModelOffer) -> str | None:
    return f"model {model.name!r} was not requested" if job.models and model.name not in job.models else None


def first_fit(job: JobMessage, queue_model: str, caps: Capabilities) -> ModelOffer | None:
    """The worker's model to serve ``job`` that came from ``queue_model``'s queue, if it fits."""
    offer = next((m for m in caps.models if m.name == queue_model), None)
    return offer if offer is not None and refusal(job, offer, caps) is None else None
