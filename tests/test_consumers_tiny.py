"""The tiny demo/test model builder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from consumers.cache import ModelCache
from consumers.tiny import TINY_SD, SdShapes, build_tiny_gpt2, build_tiny_sd, is_complete
from tests.test_consumers_pipelines import make_job as image_job
from tests.test_text_generation import make_job as text_job


def test_builds_a_complete_diffusers_folder(models_dir: Path) -> None:
    path = models_dir / "tiny-sd"
    assert is_complete(path)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]  # not ...Pil
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "tokenizer" / "merges.txt").is_file()


def test_an_existing_model_is_returned_as_is(models_dir: Path) -> None:
    path = models_dir / "tiny-sd"
    before = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert build_tiny_sd(path) == path
    assert time.perf_counter() - started < 0.1
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_builds_are_reproducible_and_fast(models_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    again = build_tiny_sd(tmp_path / "deep" / "tiny-sd")  # imports are warm: the build itself
    assert time.perf_counter() - started < 1.0
    for weights in (models_dir / "tiny-sd").rglob("*.safetensors"):
        assert (again / weights.relative_to(models_dir / "tiny-sd")).read_bytes() == weights.read_bytes()
    assert not [p for p in again.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "tiny-sd"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_sd(target)
    assert (target / "notes.txt").read_text() == "mine"


def test_builds_a_tiny_gpt2_transformers_folder(models_dir: Path) -> None:
    path = models_dir / "tiny-gpt2"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 1024
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [config["eos_token_id"]]  # never ends early: lengths are exact
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert build_tiny_gpt2(path) == path  # complete: left as is


def test_the_flagging_variant_differs_only_in_its_safety_checker(models_dir: Path) -> None:
    normal, flagging = models_dir / "tiny-sd", models_dir / "tiny-nsfw-sd"
    for weights in normal.rglob("*.safetensors"):
        same = (flagging / weights.relative_to(normal)).read_bytes() == weights.read_bytes()
        assert same == (weights.parent.name != "safety_checker"), weights


def test_other_sizes_are_built_and_load_as_asked(tmp_path: Path) -> None:
    """The builder's sizes (SD 1.5's and GPT-2 medium's for the GPU benchmark) reach the saved
    configs, and the worker loads and runs what it built."""
    wider = SdShapes(unet={**TINY_SD.unet, "block_out_channels": (32, 64)},
                     vae={**TINY_SD.vae, "layers_per_block": 2}, text={**TINY_SD.text, "num_hidden_layers": 3})
    sd = build_tiny_sd(tmp_path / "wider-sd", shapes=wider)
    gpt2 = build_tiny_gpt2(tmp_path / "wider-gpt2", sizes={"n_embd": 48, "n_layer": 3, "n_head": 4})
    assert json.loads((sd / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64]
    assert json.loads((sd / "vae" / "config.json").read_text())["layers_per_block"] == 2
    assert json.loads((sd / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((gpt2 / "config.json").read_text())["n_embd"] == 48
    cache = ModelCache({"wider-sd": sd, "wider-gpt2": gpt2}, device="cpu", progress=False)
    assert cache.generate("wider-sd", image_job().model_copy(update={"models": ["wider-sd"]})).image.size == (64, 64)
    assert cache.generate("wider-gpt2", text_job(max_length=5)).tokens == 5
