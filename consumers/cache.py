"""The worker's models in memory: loaded on demand, kept in an LRU bounded by memory, and the one
place a job is checked against what this worker can and will do, then generated.

The memory budget defaults to 90% of what the device has free when the worker starts (VRAM on
CUDA, RAM on the CPU). A model's need is known before loading, from its safetensors headers
(parameters x bytes per parameter in the chosen precision); a model that could never fit is a
start-up error, and loading one that does not fit next to the others first drops the least
recently used. One job generates at a time: loads and generations share one lock. A load or a
job that runs out of device memory hands back what it took (a job is then a GenerationError, which
the worker reports as faulted) so the next one starts from a clean device.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from broker import fit
from broker.messages import Capabilities, JobMessage, ModelOffer
from consumers.devices import (
    DeviceChoice,
    DtypeChoice,
    available_memory,
    dtype_for,
    element_size,
    gib,
    is_out_of_memory,
    release_memory,
    resolve_device,
)
from consumers.errors import GenerationError, ModelLoadError
from consumers.pipelines import (
    GeneratedImage,
    ImageModel,
    PreparedImage,
    generate_image,
    load_image_model,
    prepare_image,
    seed_to_int,
)
from consumers.safety import Censorlist, CensorStyle, SafetyChecker, censor_image, must_check
from consumers.sources import ModelSource, inspect_model
from consumers.text import GeneratedText, TextModel, generate_text, load_text_model

log = logging.getLogger(__name__)

_SEED_SPACE = 2**32  # the range AI Horde workers draw random seeds from
Generated = GeneratedImage | GeneratedText
LoadedModel = ImageModel | TextModel


@dataclass(frozen=True)
class Policy:
    """What a volunteer lets this worker do (its config file and flags)."""

    nsfw: bool = True  # False: every image is checked and censored when flagged
    censorlist: Censorlist = field(default_factory=Censorlist)
    censor_style: CensorStyle = "black"
    max_pixels: int = 1024 * 1024
    allow_img2img: bool = True
    allow_painting: bool = True
    max_length: int = 512  # text: new tokens per job at most
    max_context_length: int = 8192


class ModelCache:
    """Serves ``sources`` (model name -> ModelSource, or a folder to inspect) on one device."""

    def __init__(self, sources: Mapping[str, ModelSource | Path], *, device: DeviceChoice = "auto",
                 dtype: DtypeChoice = "auto", progress: bool = True, memory_budget: int | None = None,
                 policy: Policy | None = None, safety_folder: Path | None = None) -> None:
        self.sources = {name: _source(name, s) for name, s in sources.items()}
        self.device = resolve_device(device)
        self.policy = policy or Policy()
        self._dtype_choice = dtype
        self._progress = progress
        self._budget = memory_budget
        self._safety_folder = safety_folder or next(
            (s.safety_folder for s in self.sources.values() if s.safety_folder is not None), None)
        self.safety: SafetyChecker | None = None
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        # One lock for loading and generating: one job at a time on the device, and a model is
        # never dropped while it generates.
        self._lock = threading.RLock()

    @property
    def models(self) -> list[str]:
        return list(self.sources)

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    @property
    def memory_budget(self) -> int:
        if self._budget is None:
            self._budget = int(0.9 * available_memory(self.device))
        return self._budget

    def dtype(self, kind: str) -> torch.dtype:
        return dtype_for(self.device, "text" if kind == "text" else "image", self._dtype_choice)

    def need(self, name: str) -> int:
        """Bytes ``name`` takes once loaded, from its files."""
        source = self.sources[name]
        return source.bytes_at(element_size(self.dtype(source.kind)))

    # --- start-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the safety checker, refuse models that cannot fit, and load those that fit now."""
        with self._lock:
            self._load_safety()
            budget = self.memory_budget
            for name in self.sources:
                if self.need(name) > budget:
                    raise ModelLoadError(
                        f"model {name!r} does not fit in memory: it needs {gib(self.need(name))} in "
                        f"{self.dtype(self.sources[name].kind)} and this worker may use {gib(budget)} of "
                        f"{self.device} memory (--max-memory-gb, or free some)")
            for name in self.sources:
                if self._used() + self.need(name) <= budget:
                    self.get(name)
                else:
                    log.info("%s will be loaded on its first job (%s used of %s)", name, gib(self._used()),
                             gib(budget))

    def _load_safety(self) -> None:
        if self.safety is not None or not any(s.kind == "image" for s in self.sources.values()):
            return
        if self._safety_folder is None:
            if not self.policy.nsfw:
                raise ModelLoadError("this worker censors (nsfw = false) but has no safety checker: set "
                                     "safety_checker = DIR (a folder with safety_checker/ and feature_extractor/)")
            log.warning("no safety checker: jobs that must be censored will be left to other workers")
            return
        started = time.perf_counter()
        self.safety = SafetyChecker.load(self._safety_folder, device=self.device, dtype=self.dtype("image"))
        log.info("safety checker from %s: %s of %s memory (%s), loaded in %.2fs", self._safety_folder,
                 gib(self.safety.memory_bytes), self.device, self.safety.dtype, time.perf_counter() - started)

    # --- the LRU ----------------------------------------------------------------------------------

    def _used(self) -> int:
        return sum(m.memory_bytes for m in self._loaded.values())

    def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it (and dropping the least recently used) if needed."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            if name not in self.sources:
                raise ModelLoadError(f"this worker does not serve model {name!r}")
            need = self.need(name)
            while self._loaded and self._used() + need > self.memory_budget:
                dropped, _ = self._loaded.popitem(last=False)
                release_memory(self.device)
                log.info("dropped %s from memory to make room for %s", dropped, name)
            try:
                self._loaded[name] = self._load(self.sources[name])
            except ModelLoadError:
                release_memory(self.device)  # the weights already moved before the failure
                raise
            return self._loaded[name]

    def _load(self, source: ModelSource) -> LoadedModel:
        started = time.perf_counter()
        dtype = self.dtype(source.kind)
        model: LoadedModel
        if source.kind == "text":
            model = load_text_model(source, device=self.device, dtype=dtype, progress=self._progress)
        else:
            model = load_image_model(source, device=self.device, dtype=dtype, progress=self._progress)
        log.info("loaded %s: %s in %s on %s in %.2fs", source.describe(), gib(model.memory_bytes), dtype,
                 self.device, time.perf_counter() - started)
        return model

    # --- jobs -------------------------------------------------------------------------------------

    def refusal(self, name: str, job: JobMessage) -> str | None:
        """Why this worker must not take ``job`` for model ``name`` (None: it can); the same rule
        the dispatcher applies before offering a job (``broker.fit``)."""
        offer = next((m for m in self.capabilities().models if m.name == name), None)
        if offer is None:
            return f"model {name!r} is not served here"
        return fit.refusal(job, offer, self.capabilities())

    def capabilities(self) -> Capabilities:
        """What this worker tells the dispatcher it can do, from its models and its policy."""
        p = self.policy
        return Capabilities(
            models=[ModelOffer(name=name, kind=s.kind, inpainting_only=s.inpainting_only)
                    for name, s in self.sources.items()],
            max_pixels=p.max_pixels, allow_img2img=p.allow_img2img, allow_painting=p.allow_painting,
            max_length=p.max_length, max_context_length=p.max_context_length, nsfw=p.nsfw,
            can_censor=self.safety is not None or self._safety_folder is not None,
            censorlist=list(p.censorlist.words),
        )

    def _censors(self, job: JobMessage) -> bool:
        return must_check(job, worker_nsfw=self.policy.nsfw, censorlist=self.policy.censorlist)

    @staticmethod
    def prepare(job: JobMessage) -> PreparedImage | None:
        """CPU work done before the job's turn: decoding and sizing source images."""
        return prepare_image(job) if job.kind == "image" else None

    def generate(self, name: str, job: JobMessage, *, seed: str | None = None,
                 prepared: PreparedImage | None = None) -> Generated:
        """Generate ``job`` with model ``name``; ``seed`` (e.g. the claim's) overrides the job's."""
        with self._lock:
            model = self.get(name)
            try:
                if isinstance(model, TextModel):
                    return generate_text(model, job, seed=_text_seed(seed, job))
                result = generate_image(model, job, seed=_image_seed(seed, job), prepared=prepared)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # The failed job's activations go back to the device, so the next job has room.
                release_memory(self.device)
                raise GenerationError(f"job {job.job_id}: out of {self.device} memory generating with "
                                      f"{name}") from exc
            if not self._censors(job):
                return result
            return self._check(job, result)

    def _check(self, job: JobMessage, result: GeneratedImage) -> GeneratedImage:
        if self.safety is None:
            self._load_safety()
        if self.safety is None:
            raise GenerationError(f"job {job.job_id}: censoring requested but this worker has no safety checker")
        if not self.safety.flags([result.image])[0]:
            return result
        log.info("job=%s flagged by the safety checker: image replaced (%s)", job.job_id, self.policy.censor_style)
        return GeneratedImage(image=censor_image(result.image, self.policy.censor_style), seed=result.seed,
                              seconds=result.seconds, censored=True, megapixelsteps=result.megapixelsteps,
                              metadata={**result.metadata, "censored": True})


def _source(name: str, source: ModelSource | Path) -> ModelSource:
    if isinstance(source, ModelSource):
        return source
    kind = "text" if (source / "config.json").is_file() and not (source / "model_index.json").is_file() else "image"
    return inspect_model(name, source, kind=kind)


def _image_seed(seed: str | None, job: JobMessage) -> str:
    chosen = seed if seed is not None else job.image_params.seed
    return chosen if chosen is not None else str(secrets.randbelow(_SEED_SPACE))


def _text_seed(seed: str | None, job: JobMessage) -> int:
    if seed is not None:
        return seed_to_int(seed)
    chosen = job.text_params.seed
    return chosen if chosen is not None else secrets.randbelow(_SEED_SPACE)
