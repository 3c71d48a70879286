"""The NSFW filter: one safety checker for all the worker's image models, and the censorlist.

The checker is diffusers' ``StableDiffusionSafetyChecker`` (a CLIP vision model and concept
embeddings) with its CLIP image processor, loaded from a folder holding ``safety_checker/`` and
``feature_extractor/`` (any Stable Diffusion 1.x diffusers folder has them) or from the
checker's own folder (``config.json``, weights, ``preprocessor_config.json``, as published in
``CompVis/stable-diffusion-safety-checker``). Running it outside the pipelines lets SDXL and
single-file models, which ship none, be censored too, and keeps one copy in memory.

An image is checked when the worker censors (``nsfw = false`` in its config), when the job asks
(``nsfw: false`` or ``censor_nsfw: true``), or when the prompt contains a censorlist word.
A flagged image is replaced (black, or blurred beyond recognition) and reported ``censored``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from broker import fit
from broker.fit import censor_words_in
from broker.messages import JobMessage
from consumers.devices import module_bytes
from consumers.errors import ModelLoadError

log = logging.getLogger(__name__)

CensorStyle = Literal["black", "blur"]


class SafetyChecker:
    """Flags NSFW images; ``memory_bytes`` is what the model takes on its device."""

    def __init__(self, checker: Any, processor: Any, *, device: torch.device, source: Path) -> None:
        self.checker = checker.to(device).eval()
        self.processor = processor
        self.device = device
        self.source = source
        self.memory_bytes = module_bytes(self.checker)

    @classmethod
    def load(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from consumers.pipelines import libraries_quiet, load_component

        if (folder / "safety_checker").is_dir():
            weights, processor_folder = folder / "safety_checker", folder / "feature_extractor"
        else:
            weights, processor_folder = folder, folder
        if not (weights / "config.json").is_file() or not (processor_folder / "preprocessor_config.json").is_file():
            raise ModelLoadError(f"{folder} holds no safety checker (safety_checker/ and feature_extractor/, "
                                 "or config.json and preprocessor_config.json)")
        try:
            with libraries_quiet():
                checker = load_component(StableDiffusionSafetyChecker, weights, dtype=dtype)
                processor = CLIPImageProcessor.from_pretrained(processor_folder, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load the safety checker from {folder}: {exc}") from exc
        return cls(checker, processor, device=device, source=folder)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.checker.parameters()).dtype

    @torch.inference_mode()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """For each image, whether the checker finds NSFW content in it."""
        rgb = [image.convert("RGB") for image in images]
        clip_input = self.processor(images=rgb, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in rgb])
        _, flagged = self.checker(images=arrays, clip_input=clip_input)
        return [bool(f) for f in flagged]


def censor_image(image: Image.Image, style: CensorStyle = "black") -> Image.Image:
    """The replacement for a flagged image: all black, or blurred past recognition."""
    if style == "blur":
        small = image.convert("RGB").resize((max(1, image.width // 32), max(1, image.height // 32)))
        return small.resize(image.size, Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(image.width / 16))
    return Image.new("RGB", image.size, (0, 0, 0))


@dataclass(frozen=True)
class Censorlist:
    """Words that switch the censor on, matched as whole words, case-insensitively."""

    words: tuple[str, ...] = ()

    @classmethod
    def of(cls, words: Iterable[str]) -> Censorlist:
        return cls(tuple(sorted({w.strip().lower() for w in words if w.strip()})))

    def matches(self, text: str) -> list[str]:
        return censor_words_in(text, self.words)


def must_check(job: JobMessage, *, worker_nsfw: bool, censorlist: Censorlist) -> bool:
    """Whether the job's image goes through the safety checker (``broker.fit.must_check``)."""
    return fit.must_check(job, worker_nsfw=worker_nsfw, censorlist=censorlist.words)
