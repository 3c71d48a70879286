"""Image models: loading diffusers pipelines (folders or single-file checkpoints) and generating
one image per job: txt2img, img2img and inpainting, for SD 1.x/2.x and SDXL.

Loading a folder goes component by component so that every weight is accounted for: a checkpoint
whose keys do not match its model class (e.g. saved by another transformers major version) would
otherwise load with silently re-initialised layers and produce garbage. Such a folder is refused.
A pipeline's own safety checker is not loaded: the worker runs one checker for all its models
(``consumers.safety``), which also covers SDXL and single files, which ship none.

Attention runs through PyTorch's scaled-dot-product attention (diffusers' default processor on
torch 2). Generation is synchronous and CPU/GPU bound: the worker calls it in a thread.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import io
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm

from broker.messages import JobMessage, SourceProcessing
from consumers.devices import is_out_of_memory, module_bytes
from consumers.errors import GenerationError, ModelLoadError
from consumers.samplers import scheduler_for
from consumers.sources import ModelFormat, ModelSource

log = logging.getLogger(__name__)

#: A loaded diffusers DiffusionPipeline. Its components (unet, scheduler, vae…) are attributes
#: registered at run time that type checkers cannot see, hence Any.
Pipeline = Any
WEBP_QUALITY = 90
#: libwebp's effort, 0-6 (Pillow's default 4). 2 halves the encoding time of 4 for files 2-4% larger
#: and 0.1-0.2 dB less PSNR (``bench/webp.py``); the worker encodes while the next job generates,
#: so each millisecond saved is one less competing for the GIL with the thread that feeds the GPU.
WEBP_METHOD = 2
_EXIF_DESCRIPTION, _EXIF_SOFTWARE = 0x010E, 0x0131
_NOT_LOADED = ("safety_checker",)


@dataclass(frozen=True)
class PreparedImage:
    """A job's source image and mask, decoded and sized before its turn on the GPU."""

    source: Image.Image | None = None
    mask: Image.Image | None = None


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: str
    seconds: float
    censored: bool
    megapixelsteps: float
    metadata: dict[str, Any] = field(default_factory=dict)


class ImageModel:
    """A loaded image model: its base pipeline, and img2img/inpainting views built on first use
    from the same modules (no extra memory)."""

    kind = "image"

    def __init__(self, source: ModelSource, pipe: Pipeline) -> None:
        self.source = source
        self.pipe = pipe
        self._views: dict[str, Pipeline] = {}
        self.memory_bytes = sum(module_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))

    @property
    def name(self) -> str:
        return self.source.name

    def supports(self, processing: SourceProcessing) -> bool:
        # A 9-channel inpainting UNet needs a masked image as input; it cannot draw from noise.
        return processing == "inpainting" or not self.source.inpainting_only

    def pipeline_for(self, processing: SourceProcessing) -> Pipeline:
        if not self.supports(processing):
            raise GenerationError(f"{self.name} is an inpainting model: it cannot do {processing}")
        if processing == "txt2img" or (processing == "inpainting" and self.source.inpainting_only):
            return self.pipe
        if processing not in self._views:
            builder = AutoPipelineForImage2Image if processing == "img2img" else AutoPipelineForInpainting
            with libraries_quiet():
                self._views[processing] = builder.from_pipe(self.pipe)
            self._views[processing].set_progress_bar_config(disable=True)
        return self._views[processing]


# --- loading -------------------------------------------------------------------------------------


def load_image_model(source: ModelSource, *, device: torch.device, dtype: torch.dtype,
                     progress: bool = True) -> ImageModel:
    """Load ``source`` onto ``device`` in ``dtype``; a clear ModelLoadError for any failure."""
    try:
        with libraries_quiet():
            if source.format is ModelFormat.single_file:
                pipe = _load_single_file(source, dtype=dtype, progress=progress)
            else:
                pipe = load_pipeline(source.path, device=None, dtype=dtype, progress=progress,
                                     allow_pickle=source.pickled)
        pipe = pipe.to(device)
    except ModelLoadError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ModelLoadError(f"{source.name} does not fit in {device} memory: {exc}") from exc
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"cannot load {source.describe()}: {type(exc).__name__}: {first_line}") from exc
    pipe.set_progress_bar_config(disable=True)  # generation logs one line per job instead
    _alias_text_model(pipe)
    return ImageModel(source, pipe)


def _alias_text_model(pipe: Pipeline) -> None:
    """Let diffusers' clip_skip reach the final layer norm under transformers 5.

    diffusers reads ``text_encoder.text_model.final_layer_norm``; transformers 5 flattened
    CLIPTextModel, whose ``final_layer_norm`` is now its own. The alias is a plain attribute (not a
    registered submodule), so it adds no parameters and no cycle to the module tree.
    """
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
        object.__setattr__(encoder, "text_model", encoder)


def load_pipeline(path: Path, *, device: torch.device | None, dtype: torch.dtype = torch.float32,
                  progress: bool = True, allow_pickle: bool = False) -> Pipeline:
    """The diffusers folder ``path`` as a pipeline without its safety checker; every weight must
    come from the folder."""
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    try:
        with libraries_quiet():
            modules = _load_modules(path, index, dtype=dtype, progress=progress, allow_pickle=allow_pickle)
            skipped = {name: None for name in _NOT_LOADED if name in index}
            # The weighted parts are passed in, so this only reads configs, tokenizer, scheduler.
            pipe = DiffusionPipeline.from_pretrained(
                path, **modules, **skipped, use_safetensors=not allow_pickle, local_files_only=True, dtype=dtype
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    return pipe if device is None else pipe.to(device)


def _load_single_file(source: ModelSource, *, dtype: torch.dtype, progress: bool) -> Pipeline:
    assert source.config is not None
    class_name = json.loads((source.config / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    pipeline_class = getattr(importlib.import_module("diffusers"), class_name, None)
    if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
        raise ModelLoadError(f"{source.config}: {class_name} cannot load single-file checkpoints")
    with tqdm(total=1, desc=f"Loading {source.name}", unit="file", disable=not progress) as bar:
        pipe = pipeline_class.from_single_file(
            str(source.path), config=str(source.config), local_files_only=True, dtype=dtype, safety_checker=None,
        )
        bar.update()
    meta = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            and any(p.device.type == "meta" for p in module.parameters())]
    if meta:
        raise ModelLoadError(f"{source.path}: weights missing for {', '.join(meta)}")
    if not source.pickled:
        _check_coverage(source.path, pipe)
    return pipe


#: Where each component's weights sit in an original-layout checkpoint (SD 1.x, 2.x, SDXL).
_CHECKPOINT_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("cond_stage_model.transformer.", "cond_stage_model.model.",
                     "conditioner.embedders.0.transformer.", "conditioner.embedders.0.model."),
    "text_encoder_2": ("conditioner.embedders.1.model.",),
}


def _check_coverage(path: Path, pipe: Pipeline) -> None:
    """Refuse a checkpoint that lacks weights for a component: without accelerate, diffusers
    loads single files non-strictly, and whatever is missing would stay randomly initialised."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(path), "pt") as checkpoint:
        for key in checkpoint.keys():
            count = 1
            for dim in checkpoint.get_slice(key).get_shape():
                count *= dim
            counts[key] = count
    for name, prefixes in _CHECKPOINT_PREFIXES.items():
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        needed = sum(p.numel() for p in module.parameters())
        held = sum(n for key, n in counts.items() if key.startswith(prefixes))
        if held < needed:
            raise ModelLoadError(f"{path}: the checkpoint holds {held:,} of the {needed:,} weights of its {name}; "
                                 "the rest would be random")


@contextmanager
def libraries_quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' bars and advice while loading; ours shows progress.

    Their bars are per file and their warnings are advice we have acted on (no accelerate on
    purpose; no safety checker in the pipeline, because the worker runs its own).
    """
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bar in saved:
            lib.set_verbosity(verbosity)
            if bar:
                lib.enable_progress_bar()


def _load_modules(path: Path, index: dict[str, Any], *, dtype: torch.dtype, progress: bool,
                  allow_pickle: bool) -> dict[str, torch.nn.Module]:
    """The weighted components (UNet, VAE, encoders), each checked for missing keys."""
    weighted = {
        name: cls
        for name, entry in index.items()
        if isinstance(entry, list) and name not in _NOT_LOADED and (cls := component_class(entry)) is not None
    }
    modules: dict[str, torch.nn.Module] = {}
    for name in tqdm(sorted(weighted), desc=f"Loading {path.name}", unit="part", disable=not progress):
        modules[name] = load_component(weighted[name], path / name, dtype=dtype, allow_pickle=allow_pickle)
    return modules


def component_class(entry: list[Any]) -> type[torch.nn.Module] | None:
    """The torch module class a model_index.json entry names; None for tokenizers, schedulers."""
    library, class_name = entry if len(entry) == 2 else (None, None)
    if not library or not class_name:
        return None
    # diffusers records pipeline-specific classes by their pipeline folder ("stable_diffusion").
    module_name = library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}"
    cls = getattr(importlib.import_module(module_name), class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def load_component(cls: type[torch.nn.Module], folder: Path, *, dtype: torch.dtype,
                   allow_pickle: bool = False) -> torch.nn.Module:
    """One component from its folder; refused if any weight is missing or of the wrong shape."""
    module, info = cls.from_pretrained(  # type: ignore[attr-defined]
        folder, use_safetensors=not allow_pickle, local_files_only=True, dtype=dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ModelLoadError(
            f"{folder}: weights do not match {cls.__name__} "
            f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, mismatched {mismatched[:5]})"
        )
    if info.get("unexpected_keys"):
        log.debug("%s: ignoring unexpected keys %s", folder, sorted(info["unexpected_keys"])[:5])
    return module


# --- generating ----------------------------------------------------------------------------------


def prepare_image(job: JobMessage) -> PreparedImage:
    """Decode and size the job's source image and mask (CPU work done before its GPU turn).

    Inpainting repaints the mask's white pixels; without a mask, the source's transparent ones.
    """
    if job.source_image is None:
        return PreparedImage()
    params = job.image_params
    size = (params.width, params.height)
    source = _open(job.source_image, "source_image")
    if "A" not in source.getbands() and "transparency" in source.info:
        source = source.convert("RGBA")  # a palette image with a transparent colour
    mask = None
    if job.source_processing == "inpainting":
        if job.source_mask is not None:
            mask = _open(job.source_mask, "source_mask").convert("L")
        elif "A" in source.getbands():
            mask = Image.eval(source.getchannel("A"), lambda alpha: 255 - alpha)
        else:
            raise GenerationError("inpainting needs a source_mask or a source_image with transparent pixels")
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    return PreparedImage(source=source.convert("RGB").resize(size, Image.Resampling.LANCZOS), mask=mask)


def _open(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise GenerationError(f"{what} is not a readable image: {exc}") from exc
    return image


def generate_image(model: ImageModel, job: JobMessage, *, seed: str, prepared: PreparedImage | None = None
                   ) -> GeneratedImage:
    """Generate the one image ``job`` asks for with ``seed`` (uncensored: the caller checks it)."""
    params = job.image_params
    prepared = prepared or prepare_image(job)
    pipe = model.pipeline_for(job.source_processing)
    seed_int = seed_to_int(seed)
    view = copy.copy(pipe)  # its own scheduler; the shared pipeline never sees a job's choice
    view.scheduler = scheduler_for(params.sampler_name, karras=params.karras, base_config=pipe.scheduler.config,
                                   seed=seed_int)
    generator = torch.Generator(_generator_device(pipe.device)).manual_seed(seed_int)
    arguments, steps = _call_arguments(view, job, prepared)
    started = time.perf_counter()
    with torch.inference_mode():
        image = view(**arguments, generator=generator, output_type="pil").images[0]
    seconds = time.perf_counter() - started
    log.info("job=%s generated %s %dx%d seed=%s in %.2fs", job.job_id, job.source_processing, image.width,
             image.height, seed, seconds)
    return GeneratedImage(image=image, seed=seed, seconds=seconds, censored=False,
                          megapixelsteps=image.width * image.height * steps / 1e6,
                          metadata=generation_metadata(model.name, job, seed))


def _call_arguments(pipe: Pipeline, job: JobMessage, prepared: PreparedImage) -> tuple[dict[str, Any], int]:
    """The pipeline's keyword arguments, and the denoising steps they will run."""
    params = job.image_params
    arguments: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or None,
        "num_inference_steps": params.steps,
        "guidance_scale": params.cfg_scale,
    }
    steps = params.steps
    if job.source_processing == "txt2img":
        arguments.update(width=params.width, height=params.height)
    else:
        default = 1.0 if job.source_processing == "inpainting" else 0.75
        # At least one denoising step: diffusers refuses a strength that rounds to none.
        strength = max(params.denoising_strength if params.denoising_strength is not None else default,
                       1.0 / params.steps)
        arguments.update(image=prepared.source, strength=min(strength, 1.0))
        steps = max(1, int(params.steps * min(strength, 1.0)))
        if job.source_processing == "inpainting":
            arguments.update(mask_image=prepared.mask, width=params.width, height=params.height)
    # Horde clip_skip 1 means the last CLIP layer; diffusers counts the layers skipped.
    if params.clip_skip > 1 and "clip_skip" in inspect.signature(pipe.__call__).parameters:
        arguments["clip_skip"] = params.clip_skip - 1
    return arguments, steps


def generation_metadata(model: str, job: JobMessage, seed: str) -> dict[str, Any]:
    """What the result image records about how it was made (not the prompt: images get shared)."""
    p = job.image_params
    return {"model": model, "seed": seed, "sampler_name": p.sampler_name, "karras": p.karras, "steps": p.steps,
            "cfg_scale": p.cfg_scale, "width": p.width, "height": p.height, "clip_skip": p.clip_skip,
            "source_processing": job.source_processing, "denoising_strength": p.denoising_strength}


def _generator_device(device: torch.device) -> str:
    # CUDA draws its noise on the GPU; MPS generators are not reproducible, so MPS draws on the CPU.
    return "cuda" if device.type == "cuda" else "cpu"


def seed_to_int(seed: str) -> int:
    """The generator seed for a horde seed string: its number, or a stable hash of the text."""
    text = seed.strip()
    if text.isdecimal() and int(text) < 2**63:
        return int(text)
    return int.from_bytes(hashlib.sha256(seed.encode("utf-8")).digest()[:4], "big")


def encode_webp(image: Image.Image, metadata: dict[str, Any] | None = None) -> bytes:
    """WebP bytes; ``metadata`` goes into the EXIF ImageDescription as JSON."""
    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = "horde-rabbitmq worker"
    if metadata:
        exif[_EXIF_DESCRIPTION] = json.dumps(metadata, sort_keys=True)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD, exif=exif.tobytes())
    return buffer.getvalue()


def read_metadata(webp: bytes) -> dict[str, Any]:
    """The generation metadata ``encode_webp`` stored (empty if none)."""
    description = Image.open(io.BytesIO(webp)).getexif().get(_EXIF_DESCRIPTION)
    return json.loads(description) if description else {}
