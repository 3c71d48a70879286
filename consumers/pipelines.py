"""Loading diffusers image pipelines from safetensors folders, and generating one image per job.

Loading goes component by component so that every weight is accounted for: a checkpoint whose
keys do not match its model class (e.g. saved by another transformers major version) would
otherwise load with silently re-initialised layers and produce garbage. Such a folder is refused.

Generation is synchronous and CPU/GPU bound: the worker calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import io
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from broker.messages import JobMessage
from consumers.errors import GenerationError, ModelLoadError
from consumers.samplers import scheduler_for

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
#: A loaded diffusers DiffusionPipeline. Its components (unet, scheduler, safety_checker…) are
#: attributes registered at run time that type checkers cannot see, hence Any.
Pipeline = Any
WEBP_QUALITY = 90
_SEED_SPACE = 2**32  # the range AI Horde workers draw random seeds from


@dataclass(frozen=True)
class Generated:
    """One generated image, encoded, with what the requester is told about it."""

    image: bytes  # WebP
    width: int
    height: int
    seed: str
    seconds: float
    censored: bool

    @property
    def state(self) -> Literal["ok", "censored"]:
        return "censored" if self.censored else "ok"


def resolve_device(choice: DeviceChoice = "auto") -> torch.device:
    """``auto``: CUDA, else Apple MPS, else CPU; a forced device must be present."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(choice, False):
        raise ModelLoadError(f"device {choice!r} is not available on this machine")
    return torch.device(choice)


def dtype_for(device: torch.device) -> torch.dtype:
    # Half precision only on CUDA: CPUs lack fast fp16 kernels and MPS fp16 can yield black images.
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(path: Path, *, device: torch.device, progress: bool = True) -> Pipeline:
    """Load the pipeline in ``path`` onto ``device``; every weight must come from the folder."""
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    dtype = dtype_for(device)
    try:
        with _libraries_quiet():
            modules = _load_modules(path, dtype=dtype, progress=progress)
            # The weighted parts are passed in, so this only reads configs, tokenizer, scheduler.
            pipe = DiffusionPipeline.from_pretrained(
                path, **modules, use_safetensors=True, local_files_only=True, dtype=dtype
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # generation logs one line per job instead
    return pipe


@contextmanager
def _libraries_quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' bars and advice while loading; ours shows progress.

    Their bars are per file and their warnings are advice we have acted on (no accelerate on
    purpose; a safety checker passed in pre-loaded, which diffusers "cannot verify").
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


def _load_modules(path: Path, *, dtype: torch.dtype, progress: bool) -> dict[str, torch.nn.Module]:
    """The weighted components (UNet, VAE, encoders, checker), each checked for missing keys."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    weighted = {
        name: cls
        for name, entry in index.items()
        if isinstance(entry, list) and (cls := _component_class(entry)) is not None
    }
    modules: dict[str, torch.nn.Module] = {}
    for name in tqdm(sorted(weighted), desc=f"Loading {path.name}", unit="part", disable=not progress):
        modules[name] = _load_module(weighted[name], path / name, dtype=dtype)
    return modules


def _component_class(entry: list[Any]) -> type[torch.nn.Module] | None:
    """The torch module class a model_index.json entry names; None for tokenizers, schedulers."""
    library, class_name = entry if len(entry) == 2 else (None, None)
    if not library or not class_name:
        return None
    # diffusers records pipeline-specific classes by their pipeline folder ("stable_diffusion").
    module_name = library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}"
    cls = getattr(importlib.import_module(module_name), class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def _load_module(cls: type[torch.nn.Module], folder: Path, *, dtype: torch.dtype) -> torch.nn.Module:
    module, info = cls.from_pretrained(  # type: ignore[attr-defined]
        folder, use_safetensors=True, local_files_only=True, dtype=dtype, output_loading_info=True
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


class PipelineCache:
    """The worker's loaded models, by model name; each is loaded once and kept in memory."""

    def __init__(self, models: dict[str, Path], *, device: DeviceChoice = "auto", progress: bool = True) -> None:
        self._paths = dict(models)
        self._device = resolve_device(device)
        self._progress = progress
        self._loaded: dict[str, Pipeline] = {}
        self._lock = threading.Lock()  # loads may come from several threads; load each once
        # One generation at a time, even if an asyncio caller gave up waiting on its thread:
        # two would compete for the same device memory.
        self._generating = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def models(self) -> list[str]:
        return list(self._paths)

    def get(self, model: str) -> Pipeline:
        with self._lock:
            if model not in self._loaded:
                if model not in self._paths:
                    raise ModelLoadError(f"this worker does not serve model {model!r}")
                self._loaded[model] = load_pipeline(self._paths[model], device=self._device, progress=self._progress)
            return self._loaded[model]

    def load_all(self) -> None:
        for model in self._paths:
            self.get(model)

    def generate(self, model: str, job: JobMessage, *, seed: str | None = None) -> Generated:
        pipe = self.get(model)
        with self._generating:
            return generate(pipe, job, seed=seed)


def generate(pipe: Pipeline, job: JobMessage, *, seed: str | None = None) -> Generated:
    """Generate the one image ``job`` asks for; ``seed`` (e.g. the claim's) overrides the job's.

    The safety checker runs when the requester refuses NSFW (``nsfw=False``) or asks for
    censoring; a model without a checker cannot honour that and the job fails.
    """
    params = job.params
    seed_text = seed if seed is not None else params.seed
    if seed_text is None:
        seed_text = str(secrets.randbelow(_SEED_SPACE))
    view = _view(pipe, job, check=job.censor_nsfw or not job.nsfw)
    generator = torch.Generator(_generator_device(pipe.device)).manual_seed(seed_to_int(seed_text))
    started = time.perf_counter()
    output = view(**_call_arguments(view, job), generator=generator, output_type="pil")
    image = output.images[0]
    censored = bool((getattr(output, "nsfw_content_detected", None) or [False])[0])
    webp = encode_webp(image)
    seconds = time.perf_counter() - started
    log.info("job=%s generated %dx%d seed=%s in %.2fs (%s)", job.job_id, image.width, image.height,
             seed_text, seconds, "censored" if censored else "ok")
    return Generated(webp, image.width, image.height, seed_text, seconds, censored)


def _view(pipe: Pipeline, job: JobMessage, *, check: bool) -> Pipeline:
    """A per-job pipeline sharing ``pipe``'s modules, with its own scheduler and checker choice.

    A shallow copy: assigning a component on it rebinds the copy's attribute and config only,
    so the cached pipeline never sees a job's sampler or checker choice. (``from_pipe`` would do
    the same but re-casts every module's dtype on each call.)
    """
    has_checker = getattr(pipe, "safety_checker", None) is not None
    if check and not has_checker:
        raise GenerationError(f"job {job.job_id}: censoring requested but this model has no safety checker")
    view = copy.copy(pipe)
    view.scheduler = scheduler_for(
        job.params.sampler_name, karras=job.params.karras, base_config=pipe.scheduler.config
    )
    if has_checker and not check:
        view.safety_checker = None
    return view


def _call_arguments(pipe: Pipeline, job: JobMessage) -> dict[str, Any]:
    params = job.params
    arguments: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or None,
        "width": params.width,
        "height": params.height,
        "num_inference_steps": params.steps,
        "guidance_scale": params.cfg_scale,
    }
    # Horde clip_skip 1 means the last CLIP layer; diffusers counts the layers skipped.
    if params.clip_skip > 1 and "clip_skip" in inspect.signature(pipe.__call__).parameters:
        arguments["clip_skip"] = params.clip_skip - 1
    return arguments


def _generator_device(device: torch.device) -> str:
    # CUDA draws its noise on the GPU; MPS generators are not reproducible, so MPS draws on the CPU.
    return "cuda" if device.type == "cuda" else "cpu"


def seed_to_int(seed: str) -> int:
    """The generator seed for a horde seed string: its number, or a stable hash of the text."""
    text = seed.strip()
    if text.isdecimal() and int(text) < 2**63:
        return int(text)
    return int.from_bytes(hashlib.sha256(seed.encode("utf-8")).digest()[:4], "big")


def encode_webp(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="WEBP", quality=WEBP_QUALITY)
    return buffer.getvalue()

