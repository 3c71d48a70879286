"""The message schemas on the wire, versioned, shared by publishers and consumers.

Every message is JSON. Its schema name and version travel in the AMQP ``type`` property
(``job.v1``); a consumer refuses a message whose type it does not know instead of guessing.
Bytes (images) travel as base64 inside the JSON, so one parser reads every message.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError

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


class JobMessage(Message):
    """A job to generate, published to ``horde.jobs`` with routing key = model."""

    schema_name: ClassVar[str] = "job.v1"
    job_id: str
    request_id: str
    kind: Literal["image", "text"]
    models: list[str]
    prompt: str
    negative_prompt: str = ""
    params: ImageParams
    nsfw: bool = True
    censor_nsfw: bool = False
    tier: int = Field(ge=0, le=4)
    attempt: int = 0
    created_at: datetime


class ClaimRequest(Message):
    """A worker asks the claims service for the lease on a job it received (RPC, direct reply-to)."""

    schema_name: ClassVar[str] = "claim.v1"
    job_id: str
    worker: str
    model: str


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
    """A worker's result, published with routing key ``job.completed.<worker>`` and its user_id."""

    schema_name: ClassVar[str] = "job-completed.v1"
    job_id: str
    lease_id: str
    worker: str
    model: str
    seed: str
    state: Literal["ok", "censored"] = "ok"
    image: B64Bytes = Field(repr=False)
    media_type: Literal["image/webp"] = "image/webp"
    width: int
    height: int
    generation_seconds: float = Field(ge=0)


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


M = TypeVar("M", bound=Message)


def decode(cls: type[M], body: bytes, type_property: str | None) -> M:
    """Parse a message body as ``cls``; raise BadMessage if its type or content does not fit."""
    if type_property is not None and type_property != cls.schema_name:
        raise BadMessage(f"expected message type {cls.schema_name}, got {type_property}")
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"invalid {cls.schema_name}: {exc.error_count()} error(s): {exc.errors()[0]['msg']}") from exc
