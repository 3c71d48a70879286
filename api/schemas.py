"""Request and response bodies in AI Horde API v2's shapes (field names, defaults, ranges)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Samplers the workers map onto diffusers schedulers (consumers.pipelines).
SAMPLERS = frozenset({
    "k_euler", "k_euler_a", "k_dpmpp_2m", "k_dpmpp_sde", "k_dpm_2", "k_dpm_2_a", "k_heun", "k_lms",
    "k_dpmpp_2s_a", "ddim",
})

Dimension = Annotated[int, Field(ge=64, le=3072, description="Pixels; a multiple of 64.")]


class ImageParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    width: Dimension = 512
    height: Dimension = 512
    steps: int = Field(30, ge=1, le=500)
    n: int = Field(1, ge=1, le=20, description="Images to generate; each is its own job.")
    seed: str | None = Field(None, max_length=40)
    sampler_name: str = "k_euler_a"
    cfg_scale: float = Field(7.5, ge=0, le=100)
    karras: bool = True
    clip_skip: int = Field(1, ge=1, le=12)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64, got {value}")
        return value

    @field_validator("sampler_name")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; known: {', '.join(sorted(SAMPLERS))}")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value


class ImageGenerateRequest(BaseModel):
    """POST /v2/generate/async. Unknown fields that AI Horde clients send are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=30_000, description="Negative prompt after '###'.")
    params: ImageParams = Field(default_factory=ImageParams)
    models: list[str] = Field(default_factory=list, max_length=50,
                              description="Any of these may serve it; empty: any image model.")
    nsfw: bool = True
    censor_nsfw: bool = False
    dry_run: bool = False


class AsyncAccepted(BaseModel):
    id: str
    kudos: float
    message: str | None = None


class DryRun(BaseModel):
    kudos: float


class RequestStatusCheck(BaseModel):
    finished: int
    processing: int
    restarted: int
    waiting: int
    done: bool
    faulted: bool
    wait_time: int
    queue_position: int
    kudos: float
    is_possible: bool


class ImageGeneration(BaseModel):
    img: str = Field(description="The image, base64-encoded WebP.")
    seed: str
    id: str
    censored: bool
    model: str
    state: str
    worker_id: str
    worker_name: str
    gen_metadata: list[dict[str, str]] = Field(default_factory=list)


class RequestStatusStable(RequestStatusCheck):
    generations: list[ImageGeneration]
    shared: bool = False


class ErrorBody(BaseModel):
    message: str
    rc: str
