"""The message schemas on the wire, versioned, shared by publishers and consumers.

Every message is JSON. Its schema name and version travel in the AMQP ``type`` property
(``job.v1``); a consumer refuses a message whose type it does not know instead of guessing.
Bytes (images) travel as base64 inside the JSON, so one parser reads every message.

Versioning: a schema keeps its name while it only gains optional fields, so every message an
older publisher wrote still parses (``job.v1`` gained text jobs and source images,
``job-completed.v1`` gained text results, both that way); a change that would make an old
message invalid gets a new name (``job.v2``) and consumers read both during the switch.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    model_validator,
)

from broker.errors import BadMessage


def _b64decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise ValueError("expected base64 text")


B64Bytes = Annotated[
    bytes,
    PlainValidator(_b64decode),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]


class Message(BaseModel):
    """Base of every wire message: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_name: ClassVar[str]

    def encode(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class ImageParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler_name: str
    karras: bool
    seed: str | None = None
    clip_skip: int = 1
    denoising_strength: float | None = None


class TextParams(BaseModel):
    """A text job's sampling parameters (KoboldAI's names, as AI Horde's text API takes them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_length: int = Field(80, ge=1, description="New tokens to generate at most.")
    max_context_length: int = Field(1024, ge=1, description="Tokens of prompt plus generation the model sees.")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.92, gt=0, le=1)
    top_k: int = Field(100, ge=0, description="0: off.")
    rep_pen: float = Field(1.1, gt=0, description="Repetition penalty; 1: off.")
    stop_sequence: list[str] = Field(default_factory=list)
    seed: int | None = None


SourceProcessing = Literal["txt2img", "img2img", "inpainting"]


class JobMessage(Message):
    """A job to generate, published to ``horde.jobs`` with routing key = model.

    ``params`` is ``ImageParams`` or ``TextParams`` according to ``kind``. Image jobs may carry a
    source image (img2img) and a mask (inpainting; without one, the source's transparent pixels
    are repainted).
    """

    schema_name: ClassVar[str] = "job.v1"
    job_id: str
    request_id: str
    kind: Literal["image", "text"]
    models: list[str]
    prompt: str
    negative_prompt: str = ""
    params: ImageParams | TextParams
    nsfw: bool = True
    censor_nsfw: bool = False
    tier: int = Field(ge=0, le=4)
    attempt: int = 0
    created_at: datetime
    source_processing: SourceProcessing = "txt2img"
    source_image: B64Bytes | None = Field(None, repr=False)
    trusted_workers: bool = False  # the requester asked that only trusted workers do it
    source_mask: B64Bytes | None = Field(None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _params_of_kind(cls, data: Any) -> Any:
        """Parse ``params`` as the kind's class (a plain union would guess from the fields)."""
        if isinstance(data, dict) and isinstance(data.get("params"), dict):
            params_class = TextParams if data.get("kind") == "text" else ImageParams
            data = {**data, "params": params_class.model_validate(data["params"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobMessage:
        expected = TextParams if self.kind == "text" else ImageParams
        if not isinstance(self.params, expected):
            raise ValueError(f"a {self.kind} job needs {expected.__name__}")
        if self.source_processing != "txt2img" and (self.kind != "image" or self.source_image is None):
            raise ValueError(f"{self.source_processing} needs an image job with a source_image")
        return self

    @property
    def image_params(self) -> ImageParams:
        assert isinstance(self.params, ImageParams), f"job {self.job_id} is a {self.kind} job"
        return self.params

    @property
    def text_params(self) -> TextParams:
        assert isinstance(self.params, TextParams), f"job {self.job_id} is a {self.kind} job"
        return self.params


class ClaimRequest(Message):
    """A worker asks the claims service for the lease on a job from its own queue (RPC, direct
    reply-to), or gives back a job it was offered and cannot do (``decline``)."""

    schema_name: ClassVar[str] = "claim.v1"
    job_id: str
    worker: str
    model: str
    # Not a claim but "I will not do this one": the claims service puts the job back in the
    # model's queue and answers, and only then does the worker ack (it never nacks: issue 6).
    decline: bool = False
    # With ``decline``: the lease of a job the dispatcher offered, given back unstarted.
    lease_id: str | None = None


class ModelOffer(BaseModel):
    """One model a worker serves, as the dispatcher needs to know it to match jobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    kind: Literal["image", "text"]
    inpainting_only: bool = False


class Capabilities(BaseModel):
    """What a worker can and may do (its models and its owner's policy): the dispatcher sends it
    only jobs ``broker.fit.refusal`` finds no reason to refuse."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    models: list[ModelOffer] = Field(min_length=1, max_length=500)
    max_pixels: int = 1024 * 1024
    allow_img2img: bool = True
    allow_painting: bool = True
    max_length: int = 512
    max_context_length: int = 8192
    nsfw: bool = True
    can_censor: bool = False  # it has a safety checker
    censorlist: list[str] = Field(default_factory=list, max_length=1000)


#: Jobs one ask may ask for (AI Horde's pop takes an ``amount`` up to 20).
MAX_ASK_AMOUNT = 20


class JobAsk(Message):
    """A worker asks the dispatcher for its next job (``ask.<worker>``, direct reply-to).

    The dispatcher answers once, when it has leased a job that fits to this worker, with a
    ``JobOffer`` carrying the job and its lease. The worker sends the same ask again (same
    correlation id) every few seconds while it waits: that keeps the ask alive, and a dispatcher
    that restarted learns it again.

    ``amount``: up to this many jobs in the one offer (a worker that generates several at once),
    within the worker's lease cap; the offer carries as many as the round found, at least one.
    """

    schema_name: ClassVar[str] = "ask.v1"
    worker: str
    capabilities: Capabilities
    amount: int = Field(1, ge=1, le=MAX_ASK_AMOUNT)


class OfferedJob(BaseModel):
    """A further job leased in the same offer (``JobOffer.also``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    job: JobMessage
    model: str
    lease_id: str
    lease_deadline: datetime


class JobOffer(Message):
    """The dispatcher's answer to an ask: a leased job, or why there is none (ask again later)."""

    schema_name: ClassVar[str] = "offer.v1"
    granted: bool
    reason: str = ""
    job: JobMessage | None = None
    model: str = ""
    lease_id: str | None = None
    lease_deadline: datetime | None = None
    retry_after: float = 0.0
    # The further jobs leased to an ask for ``amount`` > 1, each with its own lease; only ever sent
    # to an ask that had an amount, so a worker that never asks for more never sees the field.
    also: list[OfferedJob] = Field(default_factory=list, max_length=MAX_ASK_AMOUNT - 1)

    def leased(self) -> list[JobOffer]:
        """This offer as one single-job offer per job it leases (the first, then ``also``)."""
        if not self.granted:
            return []
        first = self.model_copy(update={"also": []})
        return [first, *(JobOffer(granted=True, job=o.job, model=o.model, lease_id=o.lease_id,
                                  lease_deadline=o.lease_deadline) for o in self.also)]


class ClaimReply(Message):
    schema_name: ClassVar[str] = "claim-reply.v1"
    job_id: str
    granted: bool
    reason: str = ""
    lease_id: str | None = None
    lease_deadline: datetime | None = None
    seed: str | None = None
    # Denied but another worker may take it (e.g. a model this worker cannot run): requeue.
    requeue: bool = False


class JobCompleted(Message):
    """A worker's result, published with routing key ``job.completed.<worker>`` and its user_id.

    Exactly one of ``image`` (WebP, with ``width`` and ``height``) and ``text`` (with the number
    of ``tokens`` generated) is set; ``media_type`` says which.
    """

    schema_name: ClassVar[str] = "job-completed.v1"
    job_id: str
    lease_id: str
    worker: str
    model: str
    seed: str
    state: Literal["ok", "censored"] = "ok"
    image: B64Bytes | None = Field(None, repr=False)
    text: str | None = Field(None, repr=False)
    media_type: Literal["image/webp", "text/plain"] = "image/webp"
    width: int = Field(0, ge=0)
    height: int = Field(0, ge=0)
    tokens: int = Field(0, ge=0)
    generation_seconds: float = Field(ge=0)

    @model_validator(mode="after")
    def _one_result(self) -> JobCompleted:
        if (self.image is None) == (self.text is None):
            raise ValueError("a completion carries either an image or a text")
        if (self.media_type == "text/plain") != (self.text is not None):
            raise ValueError(f"media_type {self.media_type} does not match the result")
        return self


class JobsCompleted(Message):
    """Several results of one worker in one message (routing key ``job.completed.<worker>``, its
    user_id): a worker handed several jobs in one offer may send them back together, for one
    publish, confirm and delivery instead of one each. Each counts or is refused on its own."""

    schema_name: ClassVar[str] = "jobs-completed.v1"
    completions: list[JobCompleted] = Field(min_length=1, max_length=MAX_ASK_AMOUNT)

    @model_validator(mode="after")
    def _one_worker(self) -> JobsCompleted:
        if len({c.worker for c in self.completions}) != 1:
            raise ValueError("the completions of one message come from one worker")
        return self


class JobFaulted(Message):
    """A worker could not generate a job it holds; the job goes back to the queue."""

    schema_name: ClassVar[str] = "job-faulted.v1"
    job_id: str
    lease_id: str
    worker: str
    reason: str = Field(max_length=2000)


class JobDone(Message):
    """Trusted: the API accepted a completion; the ledger settles it (routing key ``job.done``)."""

    schema_name: ClassVar[str] = "job-done.v1"
    job_id: str
    request_id: str
    requester_id: int
    worker_id: int
    worker_owner_id: int
    worker_name: str
    model: str
    kind: Literal["image", "text"]
    kudos: float = Field(ge=0)
    megapixelsteps: float = Field(0.0, ge=0)
    tokens: int = Field(0, ge=0)
    finished_at: datetime


#: The most ``job.done`` events one ``jobs-done.v1`` message carries (a results group's bound).
MAX_EVENTS_PER_JOBS_DONE = 256


class JobsDone(Message):
    """Trusted: the ``job.done`` events of completions accepted together, in one message (routing
    key ``job.done``). One persistent message, confirm and delivery for a whole group instead of
    one each; the ledger still records each job in its inbox (``job-done:<job_id>``), so a job
    announced again, alone or in another group, is settled once."""

    schema_name: ClassVar[str] = "jobs-done.v1"
    events: list[JobDone] = Field(min_length=1, max_length=MAX_EVENTS_PER_JOBS_DONE)


class WorkerHeartbeat(Message):
    """A worker's sign of life, every few seconds, routing key ``worker.heartbeat.<worker>``.

    Not persistent: a lost heartbeat is replaced by the next. Speeds are moving averages of the
    worker's own measurements (0 until it has done a job of that kind).
    """

    schema_name: ClassVar[str] = "worker-heartbeat.v1"
    worker: str
    models: list[str]
    loaded_models: list[str] = Field(default_factory=list)
    state: Literal["idle", "busy"]
    jobs_done: int = Field(0, ge=0)
    jobs_faulted: int = Field(0, ge=0)
    megapixelsteps_per_second: float = Field(0.0, ge=0)
    tokens_per_second: float = Field(0.0, ge=0)
    device: str = ""
    nsfw: bool = True
    max_pixels: int = Field(0, ge=0)
    uptime_seconds: float = Field(0.0, ge=0)
    sent_at: datetime


M = TypeVar("M", bound=Message)


def decode(cls: type[M], body: bytes, type_property: str | None) -> M:
    """Parse a message body as ``cls``; raise BadMessage if its type or content does not fit."""
    if type_property is not None and type_property != cls.schema_name:
        raise BadMessage(f"expected message type {cls.schema_name}, got {type_property}")
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"invalid {cls.schema_name}: {exc.error_count()} error(s): {exc.errors()[0]['msg']}") from exc


class UptimeEarned(Message):
    """Trusted: a worker stayed online for a whole interval; the ledger mints the reward to its owner.

    Routing key ``kudos.uptime``; ``interval`` numbers the completed intervals of the streak that
    began at ``streak_start``, so (worker, streak_start, interval) identifies a payment.
    """

    schema_name: ClassVar[str] = "uptime-earned.v1"
    worker_id: int
    worker_name: str
    owner_id: int
    streak_start: datetime
    interval: int = Field(ge=1)
    kudos: float = Field(gt=0)
