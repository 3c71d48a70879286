"""Request and response bodies in AI Horde API v2's shapes (field names, defaults, ranges)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from config.samplers import SAMPLER_NAMES

#: Samplers the workers map onto diffusers schedulers (config.samplers: one list for both).
SAMPLERS = SAMPLER_NAMES

Dimension = Annotated[int, Field(ge=64, le=3072, description="Pixels; a multiple of 64.")]


#: Text the database stores must hold no NUL character (PostgreSQL cannot process one in JSON text).
NO_NUL = r"^[^\x00]*$"


class ImageParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    width: Dimension = 512
    height: Dimension = 512
    steps: int = Field(30, ge=1, le=500)
    n: int = Field(1, ge=1, le=20, description="Images to generate; each is its own job.")
    seed: str | None = Field(None, max_length=40, pattern=NO_NUL)
    sampler_name: str = "k_euler_a"
    cfg_scale: float = Field(7.5, ge=0, le=100)
    karras: bool = True
    clip_skip: int = Field(1, ge=1, le=12)
    denoising_strength: float | None = Field(None, ge=0.01, le=1.0,
                                             description="img2img: how much of the source to repaint.")

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

    prompt: str = Field(min_length=1, max_length=30_000, pattern=NO_NUL, description="Negative prompt after '###'.")
    params: ImageParams = Field(default_factory=ImageParams)
    models: list[str] = Field(default_factory=list, max_length=50,
                              description="Any of these may serve it; empty: any image model.")
    nsfw: bool = True
    censor_nsfw: bool = False
    trusted_workers: bool = Field(False, description="Only workers whose owner has the trusted role may serve it.")
    dry_run: bool = False
    source_image: str | None = Field(None, description="img2img/inpainting source: a base64 image (WebP, PNG…).")
    source_processing: Literal["img2img", "inpainting", "outpainting"] = Field(
        "img2img", description="What to do with source_image; outpainting repaints its transparent pixels.")
    source_mask: str | None = Field(None, description="Inpainting: base64 mask, white where to repaint. "
                                                      "Without it, the source's transparent pixels are.")

    @field_validator("source_image", "source_mask")
    @classmethod
    def _base64_image(cls, value: str | None) -> str | None:
        return None if value is None else check_base64_image(value)

    @model_validator(mode="after")
    def _source_fits_processing(self) -> ImageGenerateRequest:
        if self.source_image is None:
            if self.source_mask is not None:
                raise ValueError("source_mask needs a source_image")
            return self
        if self.source_processing != "img2img" and self.source_mask is None and not has_alpha(self.source_image):
            raise ValueError(f"{self.source_processing} needs a source_mask or a source_image with transparency")
        return self


#: Source images and masks larger than this (decoded) are refused.
MAX_SOURCE_BYTES = 10 * 1024 * 1024


def check_base64_image(value: str) -> str:
    """``value`` if it is a base64-encoded image the workers can open; ValueError otherwise."""
    import base64
    import binascii
    import io

    from PIL import Image

    if value.startswith(("http://", "https://")):
        raise ValueError("must be a base64-encoded image: this horde does not fetch URLs")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise ValueError(f"is larger than {MAX_SOURCE_BYTES // (1024 * 1024)} MiB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            if image.width * image.height > 3072 * 3072:
                raise ValueError(f"is {image.width}x{image.height}, larger than 3072x3072")
    except ValueError:
        raise
    except Exception:  # PIL raises many types for corrupt data
        raise ValueError("is not an image PIL can read (WebP, PNG, JPEG…)") from None
    return value


def has_alpha(value: str) -> bool:
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(value))) as image:
        return "A" in image.getbands() or "transparency" in image.info


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


# --- text generation (KoboldAI's parameter names, as AI Horde's /v2/generate/text/* takes them) ---


class TextGenerationParams(BaseModel):
    """Sampling parameters of a text request; defaults are KoboldAI Lite's."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    n: int = Field(1, ge=1, le=20, description="Texts to generate; each is its own job.")
    max_length: int = Field(80, ge=1, le=512, description="New tokens to generate at most.")
    max_context_length: int = Field(1024, ge=80, le=65536,
                                    description="Tokens of prompt plus generation the model sees; the prompt "
                                                "is cut from the left to fit.")
    temperature: float = Field(0.7, ge=0, le=5, description="0: greedy.")
    top_p: float = Field(0.92, ge=0.001, le=1)
    top_k: int = Field(100, ge=0, le=100, description="0: off.")
    rep_pen: float = Field(1.1, ge=1, le=3)
    stop_sequence: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(default_factory=list,
                                                                                     max_length=128)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, validation_alias=AliasChoices("seed", "sampler_seed"),
                             description="Sampling seed; the n jobs of a request use seed, seed+1, …")


class TextGenerateRequest(BaseModel):
    """POST /v2/generate/text/async. Unknown fields (softprompt, …) are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=500_000, pattern=NO_NUL)
    params: TextGenerationParams = Field(default_factory=TextGenerationParams)
    models: list[str] = Field(default_factory=list, max_length=50,
                              description="Any of these may serve it; empty: any text model.")
    trusted_workers: bool = Field(False, description="Only workers whose owner has the trusted role may serve it.")
    dry_run: bool = False


class TextGeneration(BaseModel):
    text: str
    seed: int
    id: str
    model: str
    state: str
    worker_id: str
    worker_name: str
    gen_metadata: list[dict[str, str]] = Field(default_factory=list)


class RequestStatusKobold(RequestStatusCheck):
    generations: list[TextGeneration]
