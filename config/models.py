"""The model reference: which models the horde serves, their kind, baseline and size.

The API validates requests against it and workers read it to learn what a model name means.
It is plain data, loaded from JSON; the default file ships with the package.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field, TypeAdapter

DEFAULT_REFERENCE = Path(__file__).with_name("models.json")


class ModelKind(str, Enum):
    image = "image"
    text = "text"


class ModelSpec(BaseModel, frozen=True):
    name: str = Field(min_length=1, max_length=200)
    kind: ModelKind
    baseline: str = Field(description="stable_diffusion_1, stable_diffusion_xl, gpt2, llama, …")
    size_gb: float = Field(0.0, ge=0, description="Weights on disk, to plan memory.")
    parameters_b: float = Field(0.0, ge=0, description="Billions of parameters (text models).")
    inpainting: bool = Field(False, description="An inpainting model (9-channel UNet): it serves inpainting only.")
    description: str = ""


class ModelReference:
    """An immutable lookup of the known models."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self._by_name = {spec.name: spec for spec in specs}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def get(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def names(self, kind: ModelKind | None = None) -> list[str]:
        return [s.name for s in self._by_name.values() if kind is None or s.kind == kind]


def load_model_reference(path: Path | None = None) -> ModelReference:
    raw = json.loads((path or DEFAULT_REFERENCE).read_text(encoding="utf-8"))
    return ModelReference(TypeAdapter(list[ModelSpec]).validate_python(raw))
