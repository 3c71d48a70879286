"""Finding a model's weights on disk and what they are, before loading anything.

A worker serves each model from its models directory, as one of:

- a **diffusers folder** ``DIR/<name>/`` (``model_index.json``, one sub-folder per component);
- a **single-file checkpoint** ``DIR/<name>.safetensors`` in the original Stable Diffusion
  layout. It holds weights only: the component configs and tokenizer come from a weights-free
  diffusers folder for its baseline, ``DIR/configs/<baseline>/`` (e.g. ``configs/
  stable_diffusion_xl``), because a worker runs offline and cannot fetch them;
- a **transformers folder** ``DIR/<name>/`` (``config.json``, tokenizer files, safetensors) for
  text models.

Pickled weights (``.ckpt``, ``.bin``, ``.pt``) can run arbitrary code when loaded; they are
refused unless the volunteer passes ``--allow-pickle``. The safetensors headers tell how many
parameters a model has, so its memory need is known before it is loaded.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from consumers.errors import ModelLoadError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_NATIVE_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1}
#: Components loaded separately (one safety checker serves all the worker's models) or weightless.
_NOT_LOADED_WITH_PIPELINE = ("safety_checker", "feature_extractor", "image_encoder")

Kind = Literal["image", "text"]


class ModelFormat(enum.Enum):
    diffusers = "diffusers folder"
    single_file = "single-file checkpoint"
    transformers = "transformers folder"


@dataclass(frozen=True)
class ModelSource:
    """A model's files and what they hold."""

    name: str
    kind: Kind
    format: ModelFormat
    path: Path
    config: Path | None = None  # single file: the diffusers folder with its configs and tokenizer
    baseline: str = ""
    #: A 9-channel inpainting UNet: it can inpaint but not draw from noise or do img2img.
    inpainting_only: bool = False
    pickled: bool = False
    float_parameters: int = 0  # floating-point weights, stored at whatever precision
    other_bytes: int = 0  # integer buffers, and pickled weights whose layout is unknown
    #: A folder holding ``safety_checker/`` and ``feature_extractor/`` that came with the model.
    safety_folder: Path | None = None

    def bytes_at(self, element_size: int) -> int:
        """Memory the weights take once loaded with floats of ``element_size`` bytes."""
        return self.float_parameters * element_size + self.other_bytes

    def describe(self) -> str:
        extra = f", configs from {self.config}" if self.config else ""
        return f"{self.name} ({self.format.value} {self.path}{extra})"


def find_model(name: str, kind: Kind, models_dir: Path | None, *, baseline: str = "", explicit: Path | None = None,
               configs_dir: Path | None = None, allow_pickle: bool = False) -> ModelSource:
    """Locate ``name`` (``explicit`` path, else in ``models_dir``) and inspect its files."""
    if explicit is None and models_dir is None:
        raise ModelLoadError(f"model {name!r}: no models directory given (--models-dir DIR)")
    candidates = [explicit] if explicit is not None else _candidates(models_dir, name)  # type: ignore[arg-type]
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        where = candidates[0] if explicit is not None else f"{candidates[0]}/ or {candidates[1]}"
        raise ModelLoadError(f"model {name!r}: file not found: nothing at {where}")
    if configs_dir is None and models_dir is not None:
        configs_dir = models_dir / "configs"
    return inspect_model(name, path, kind=kind, baseline=baseline, configs_dir=configs_dir,
                         allow_pickle=allow_pickle)


def _candidates(models_dir: Path, name: str) -> list[Path]:
    folder = models_dir / name
    return [folder, folder.with_name(folder.name + ".safetensors"),
            *(folder.with_name(folder.name + suffix) for suffix in PICKLE_SUFFIXES)]


def inspect_model(name: str, path: Path, *, kind: Kind, baseline: str = "", configs_dir: Path | None = None,
                  config: Path | None = None, allow_pickle: bool = False) -> ModelSource:
    """What the folder or file at ``path`` holds, checked against the expected ``kind``."""
    if path.is_file():
        if kind != "image":
            raise ModelLoadError(f"{path}: a single-file {kind} model is not supported; use a transformers folder")
        return _single_file(name, path, baseline=baseline, configs_dir=configs_dir, config=config,
                            allow_pickle=allow_pickle)
    if (path / "model_index.json").is_file():
        if kind != "image":
            raise ModelLoadError(f"{path} is a diffusers (image) folder but {name!r} is a {kind} model")
        return _diffusers_folder(name, path, baseline=baseline, allow_pickle=allow_pickle)
    if (path / "config.json").is_file():
        if kind != "text":
            raise ModelLoadError(f"{path} is a transformers folder but {name!r} is an {kind} model "
                                 "(expected model_index.json)")
        return _transformers_folder(name, path, baseline=baseline, allow_pickle=allow_pickle)
    if path.is_dir():
        raise ModelLoadError(f"{path} is not a model folder (no model_index.json or config.json)")
    raise ModelLoadError(f"model {name!r}: file not found: {path}")


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise ModelLoadError(
            f"{path}: pickled weights can run arbitrary code when loaded; convert them to safetensors, "
            "or pass --allow-pickle if you trust their source")


def _single_file(name: str, path: Path, *, baseline: str, configs_dir: Path | None, config: Path | None,
                 allow_pickle: bool) -> ModelSource:
    pickled = path.suffix != ".safetensors"
    if pickled:
        _refuse_pickle(path, allow_pickle)
    config = config or (configs_dir / baseline if configs_dir is not None and baseline else None)
    if config is None or not (config / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path}: a single-file checkpoint needs the diffusers configs of its baseline "
            f"{baseline or '(unknown)'} at {config or 'DIR/configs/<baseline>'} (model_index.json, each "
            "component's config.json, tokenizer files; no weights needed); a worker is offline and "
            "cannot download them")
    float_params, other = (0, path.stat().st_size) if pickled else _safetensors_size([path])
    inpainting = False if pickled else _single_file_in_channels(path) == 9
    return ModelSource(name, "image", ModelFormat.single_file, path, config=config, baseline=baseline,
                       inpainting_only=inpainting, pickled=pickled, float_parameters=float_params,
                       other_bytes=other)


def _single_file_in_channels(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as checkpoint:
        key = "model.diffusion_model.input_blocks.0.0.weight"
        return checkpoint.get_slice(key).get_shape()[1] if key in checkpoint.keys() else 4


def _diffusers_folder(name: str, path: Path, *, baseline: str, allow_pickle: bool) -> ModelSource:
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    components = [c for c, entry in index.items()
                  if isinstance(entry, list) and entry[0] and c not in _NOT_LOADED_WITH_PIPELINE]
    weights: list[Path] = []
    pickled = False
    other = 0
    for component in components:
        folder = path / component
        found = sorted(folder.glob("*.safetensors"))
        if found:
            weights += found
            continue
        pickles = [p for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(pickles[0], allow_pickle)
            pickled = True
            other += sum(p.stat().st_size for p in pickles)
    float_params, native = _safetensors_size(weights)
    unet_config = path / "unet" / "config.json"
    in_channels = json.loads(unet_config.read_text())["in_channels"] if unet_config.is_file() else 4
    safety = path if (path / "safety_checker").is_dir() and (path / "feature_extractor").is_dir() else None
    return ModelSource(name, "image", ModelFormat.diffusers, path, baseline=baseline,
                       inpainting_only=in_channels == 9, pickled=pickled, float_parameters=float_params,
                       other_bytes=native + other, safety_folder=safety)


def _transformers_folder(name: str, path: Path, *, baseline: str, allow_pickle: bool) -> ModelSource:
    weights = sorted(path.glob("*.safetensors"))
    pickled = False
    other = 0
    if not weights:
        pickles = [p for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise ModelLoadError(f"{path}: no weights (*.safetensors) in this transformers folder")
        _refuse_pickle(pickles[0], allow_pickle)
        pickled = True
        other = sum(p.stat().st_size for p in pickles)
    float_params, native = _safetensors_size(weights)
    return ModelSource(name, "text", ModelFormat.transformers, path, baseline=baseline, pickled=pickled,
                       float_parameters=float_params, other_bytes=native + other)


def _safetensors_size(files: list[Path]) -> tuple[int, int]:
    """(floating-point parameters, bytes of other tensors) read from the files' headers."""
    from safetensors import safe_open

    floats = native = 0
    for file in files:
        try:
            with safe_open(str(file), "pt") as weights:
                for key in weights.keys():
                    view = weights.get_slice(key)
                    count = 1
                    for dim in view.get_shape():
                        count *= dim
                    dtype = view.get_dtype()
                    if dtype in _FLOAT_DTYPES:
                        floats += count
                    else:
                        native += count * _NATIVE_SIZES.get(dtype, 4)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from exc
    return floats, native
