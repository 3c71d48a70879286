"""Loading and generating with the tiny real SD pipeline, through the worker's own code."""

from __future__ import annotations

import copy
import io
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from broker.messages import ImageParams, JobMessage
from consumers.errors import GenerationError, ModelLoadError
from consumers.pipelines import PipelineCache, generate, load_pipeline, resolve_device, seed_to_int
from consumers.samplers import SAMPLERS

MODEL = "tiny-sd"


def make_job(*, nsfw: bool = True, censor_nsfw: bool = False, **params: Any) -> JobMessage:
    defaults: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7.5,
                                "sampler_name": "k_euler", "karras": False, "seed": "1234"}
    return JobMessage(
        job_id="job-1", request_id="req-1", kind="image", models=[MODEL], prompt="a photo of the cat",
        negative_prompt="blurry", params=ImageParams(**{**defaults, **params}), nsfw=nsfw,
        censor_nsfw=censor_nsfw, tier=0, created_at=datetime.now(UTC),
    )


def decode_webp(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP"
    return image.convert("RGB")


def loaded(pipelines: PipelineCache) -> Any:
    """The cached pipeline, typed loosely: diffusers components are dynamic attributes."""
    return pipelines.get(MODEL)


@pytest.fixture(scope="module")
def pipelines(models_dir: Path) -> PipelineCache:
    torch.set_num_threads(1)  # one thread is as fast for this size, and steadier
    return PipelineCache({MODEL: models_dir / MODEL}, device="cpu", progress=False)


@pytest.fixture
def nsfw_checker(pipelines: PipelineCache) -> Iterator[None]:
    """Make the loaded checker flag everything (concept weights below any cosine score)."""
    checker = loaded(pipelines).safety_checker
    saved = checker.concept_embeds_weights.clone()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)
    yield
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(saved)


def test_loads_every_weight_from_the_folder(pipelines: PipelineCache, models_dir: Path) -> None:
    # The loader refuses missing or mismatched keys, so loading at all proves none are missing;
    # the weights in memory are the ones on disk.
    pipe = loaded(pipelines)
    on_disk = load_file(models_dir / MODEL / "unet" / "diffusion_pytorch_model.safetensors")
    in_memory = pipe.unet.state_dict()
    assert set(on_disk) == set(in_memory)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"


def test_a_folder_missing_weights_is_refused(models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / MODEL
    shutil.copytree(models_dir / MODEL, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match="weights do not match CLIPTextModel"):
        load_pipeline(broken, device=torch.device("cpu"), progress=False)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        load_pipeline(tmp_path, device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64)])
def test_generates_a_webp_of_the_requested_size(pipelines: PipelineCache, width: int, height: int) -> None:
    result = pipelines.generate(MODEL, make_job(width=width, height=height))
    assert decode_webp(result.image).size == (width, height)
    assert (result.width, result.height) == (width, height)
    assert result.state == "ok" and result.seed == "1234" and result.seconds > 0


def test_same_seed_same_bytes_other_seed_other_bytes(pipelines: PipelineCache) -> None:
    first = pipelines.generate(MODEL, make_job(seed="7"))
    again = pipelines.generate(MODEL, make_job(seed="7"))
    other = pipelines.generate(MODEL, make_job(seed="8"))
    assert first.image == again.image
    assert first.image != other.image


def test_a_given_seed_overrides_the_jobs(pipelines: PipelineCache) -> None:
    overridden = pipelines.generate(MODEL, make_job(seed="7"), seed="99")
    assert overridden.seed == "99"
    assert overridden.image == pipelines.generate(MODEL, make_job(seed="99")).image


def test_a_random_seed_is_chosen_and_reported(pipelines: PipelineCache) -> None:
    first = pipelines.generate(MODEL, make_job(seed=None))
    second = pipelines.generate(MODEL, make_job(seed=None))
    assert first.seed.isdecimal() and first.seed != second.seed
    # The reported seed reproduces the image: the requester can regenerate it.
    assert pipelines.generate(MODEL, make_job(seed=first.seed)).image == first.image


def test_text_seeds_are_deterministic(pipelines: PipelineCache) -> None:
    assert seed_to_int("a cat") == seed_to_int("a cat") != seed_to_int("a dog")
    assert seed_to_int("42") == 42
    first = pipelines.generate(MODEL, make_job(seed="a cat"))
    assert first.seed == "a cat"
    assert first.image == pipelines.generate(MODEL, make_job(seed="a cat")).image


@pytest.mark.usefixtures("nsfw_checker")
@pytest.mark.parametrize(("nsfw", "censor_nsfw"), [(False, False), (True, True)])
def test_flagged_images_are_blacked_out_when_the_job_censors(pipelines: PipelineCache, nsfw: bool,
                                                             censor_nsfw: bool) -> None:
    result = pipelines.generate(MODEL, make_job(nsfw=nsfw, censor_nsfw=censor_nsfw))
    assert result.state == "censored"
    assert decode_webp(result.image).getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.mark.usefixtures("nsfw_checker")
def test_the_checker_is_skipped_for_nsfw_jobs(pipelines: PipelineCache) -> None:
    result = pipelines.generate(MODEL, make_job(nsfw=True, censor_nsfw=False))
    assert result.state == "ok"
    assert decode_webp(result.image).getextrema() != ((0, 0), (0, 0), (0, 0))
    assert loaded(pipelines).safety_checker is not None  # the cached pipeline is untouched


def test_censoring_without_a_checker_fails_the_job(pipelines: PipelineCache) -> None:
    unchecked = copy.copy(loaded(pipelines))
    unchecked.safety_checker = None
    with pytest.raises(GenerationError, match="no safety checker"):
        generate(unchecked, make_job(nsfw=False))


@pytest.mark.parametrize("sampler", [*SAMPLERS, "k_unknown"])
def test_each_sampler_runs(pipelines: PipelineCache, sampler: str) -> None:
    for karras in (False, True):
        result = pipelines.generate(MODEL, make_job(sampler_name=sampler, karras=karras, steps=2))
        assert decode_webp(result.image).size == (64, 64)


def test_a_sampler_changes_the_image_but_not_the_cached_scheduler(pipelines: PipelineCache) -> None:
    euler = pipelines.generate(MODEL, make_job(sampler_name="k_euler"))
    ddim = pipelines.generate(MODEL, make_job(sampler_name="ddim"))
    assert euler.image != ddim.image
    assert type(loaded(pipelines).scheduler).__name__ == "EulerDiscreteScheduler"


def test_devices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="not available"):
            resolve_device("cuda")


def test_an_unknown_model_is_refused(pipelines: PipelineCache) -> None:
    with pytest.raises(ModelLoadError, match="does not serve"):
        pipelines.get("stable_diffusion")
