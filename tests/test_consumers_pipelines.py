"""Loading and generating images with the tiny real pipelines, through the worker's own code:
diffusers folders (SD 1.x and SDXL) and a single-file checkpoint, every sampler, img2img,
inpainting, seeds, and the safety checker."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from broker.messages import ImageParams, JobMessage
from config.samplers import SAMPLER_NAMES
from consumers.cache import ModelCache, Policy
from consumers.devices import resolve_device
from consumers.errors import GenerationError, ModelLoadError
from consumers.pipelines import (
    GeneratedImage,
    encode_webp,
    load_pipeline,
    prepare_image,
    read_metadata,
    seed_to_int,
)
from consumers.safety import Censorlist, censor_image
from consumers.samplers import SAMPLERS
from consumers.sources import ModelFormat, find_model
from consumers.tiny import build_tiny_sdxl, build_tiny_single_file

MODEL = "tiny-sd"


def make_job(*, nsfw: bool = True, censor_nsfw: bool = False, prompt: str = "a photo of the cat",
             negative: str = "blurry", source: bytes | None = None, mask: bytes | None = None,
             processing: str = "txt2img", **params: Any) -> JobMessage:
    defaults: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7.5,
                                "sampler_name": "k_euler", "karras": False, "seed": "1234"}
    return JobMessage(
        job_id="job-1", request_id="req-1", kind="image", models=[MODEL], prompt=prompt,
        negative_prompt=negative, params=ImageParams(**{**defaults, **params}), nsfw=nsfw,
        censor_nsfw=censor_nsfw, tier=0, created_at=datetime.now(UTC), source_processing=processing,
        source_image=source, source_mask=mask,
    )


def webp(result: GeneratedImage) -> bytes:
    return encode_webp(result.image, result.metadata)


def decode_webp(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP"
    return image.convert("RGB")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def black(image: Image.Image) -> bool:
    return image.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.fixture(scope="module")
def image_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiny-sd (folder), tiny-xl (SDXL folder), tiny-single (the tiny-sd weights as one
    original-layout checkpoint, its configs in configs/stable_diffusion_1)."""
    root = tmp_path_factory.mktemp("image-models")
    build_tiny_sdxl(root / "tiny-xl")
    build_tiny_single_file(models_dir / MODEL, root / "tiny-single.safetensors")
    build_tiny_single_file(root / "tiny-xl", root / "tiny-xl-single.safetensors")
    (root / "configs").mkdir()
    (root / "configs" / "stable_diffusion_1").symlink_to(models_dir / MODEL, target_is_directory=True)
    (root / "configs" / "stable_diffusion_xl").symlink_to(root / "tiny-xl", target_is_directory=True)
    return {
        MODEL: find_model(MODEL, "image", models_dir, baseline="stable_diffusion_1"),
        "tiny-xl": find_model("tiny-xl", "image", root, baseline="stable_diffusion_xl"),
        "tiny-single": find_model("tiny-single", "image", root, baseline="stable_diffusion_1"),
        "tiny-xl-single": find_model("tiny-xl-single", "image", root, baseline="stable_diffusion_xl"),
    }


@pytest.fixture(scope="module")
def cache(image_models: dict[str, Any]) -> ModelCache:
    torch.set_num_threads(1)  # one thread is as fast for this size, and steadier
    cache = ModelCache(image_models, device="cpu", progress=False)
    cache.start()
    return cache


@pytest.fixture(scope="module")
def flagging(models_dir: Path) -> ModelCache:
    """The tiny SD whose safety checker flags every image, on a worker that allows NSFW."""
    cache = ModelCache({MODEL: models_dir / "tiny-nsfw-sd"}, device="cpu", progress=False,
                       policy=Policy(censorlist=Censorlist.of(["Lighthouse"])))
    cache.start()
    return cache


def test_loads_every_weight_from_the_folder(cache: ModelCache, models_dir: Path) -> None:
    # The loader refuses missing or mismatched keys, so loading at all proves none are missing;
    # the weights in memory are the ones on disk.
    pipe = cache.get(MODEL).pipe  # type: ignore[union-attr]
    on_disk = load_file(models_dir / MODEL / "unet" / "diffusion_pytorch_model.safetensors")
    in_memory = pipe.unet.state_dict()
    assert set(on_disk) == set(in_memory)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.safety_checker is None  # the worker runs one checker for all its models
    processor = next(iter(pipe.unet.attn_processors.values()))
    assert type(processor).__name__ == "AttnProcessor2_0"  # PyTorch scaled-dot-product attention


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


@pytest.mark.parametrize("model", [MODEL, "tiny-xl", "tiny-single"])
@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64)])
def test_generates_a_webp_of_the_requested_size(cache: ModelCache, model: str, width: int, height: int) -> None:
    result = cache.generate(model, make_job(width=width, height=height))
    assert isinstance(result, GeneratedImage)
    assert decode_webp(webp(result)).size == (width, height)
    assert not result.censored and result.seed == "1234" and result.seconds > 0
    assert result.megapixelsteps == pytest.approx(width * height * 4 / 1e6)


@pytest.mark.parametrize(("single", "folder"), [("tiny-single", MODEL), ("tiny-xl-single", "tiny-xl")])
def test_a_single_file_checkpoint_is_the_same_model_as_its_folder(cache: ModelCache, image_models: dict[str, Any],
                                                                 single: str, folder: str) -> None:
    """The original-layout file (converted from the folder's weights) loads offline with
    from_single_file and the local configs, and draws the very same pixels."""
    source = image_models[single]
    assert source.format is ModelFormat.single_file and source.path.suffix == ".safetensors"
    assert source.config is not None and source.config.name.startswith("stable_diffusion_")
    assert type(cache.get(single).pipe) is type(cache.get(folder).pipe)  # type: ignore[union-attr]
    from_file = cache.generate(single, make_job(seed="3")).image
    from_folder = cache.generate(folder, make_job(seed="3")).image
    assert from_file.tobytes() == from_folder.tobytes()


def test_a_single_file_missing_a_component_is_refused(image_models: dict[str, Any], tmp_path: Path) -> None:
    source = image_models["tiny-single"]
    tensors = load_file(source.path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "stable_diffusion_1").symlink_to(source.config, target_is_directory=True)
    # One tensor short: diffusers loads single files non-strictly and would leave it random.
    save_file({k: v for k, v in tensors.items() if not k.endswith("final_layer_norm.weight")},
              tmp_path / "short.safetensors")
    short = find_model("short", "image", tmp_path, baseline="stable_diffusion_1")
    with pytest.raises(ModelLoadError, match=r"holds [\d,]+ of the [\d,]+ weights of its text_encoder"):
        ModelCache({"short": short}, device="cpu", progress=False).start()
    # No text encoder at all: diffusers notices, and the error is one line.
    save_file({k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")},
              tmp_path / "none.safetensors")
    none = find_model("none", "image", tmp_path, baseline="stable_diffusion_1")
    with pytest.raises(ModelLoadError, match="Weights for this component appear to be missing") as error:
        ModelCache({"none": none}, device="cpu", progress=False).start()
    assert "\n" not in str(error.value)


def test_sdxl_is_an_sdxl_pipeline(cache: ModelCache) -> None:
    pipe = cache.get("tiny-xl").pipe  # type: ignore[union-attr]
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_results_carry_their_generation_metadata(cache: ModelCache) -> None:
    result = cache.generate(MODEL, make_job(seed="77", sampler_name="k_heun", steps=3, clip_skip=2))
    metadata = read_metadata(webp(result))
    assert metadata["seed"] == "77" and metadata["model"] == MODEL
    assert metadata["sampler_name"] == "k_heun" and metadata["steps"] == 3 and metadata["clip_skip"] == 2
    assert "prompt" not in metadata  # images get shared; prompts stay with the requester


def test_same_seed_same_bytes_other_seed_other_bytes(cache: ModelCache) -> None:
    first = webp(cache.generate(MODEL, make_job(seed="7")))
    assert first == webp(cache.generate(MODEL, make_job(seed="7")))
    assert first != webp(cache.generate(MODEL, make_job(seed="8")))


def test_a_given_seed_overrides_the_jobs(cache: ModelCache) -> None:
    overridden = cache.generate(MODEL, make_job(seed="7"), seed="99")
    assert overridden.seed == "99"
    assert webp(overridden) == webp(cache.generate(MODEL, make_job(seed="99")))


def test_a_random_seed_is_chosen_and_reported(cache: ModelCache) -> None:
    first = cache.generate(MODEL, make_job(seed=None))
    second = cache.generate(MODEL, make_job(seed=None))
    assert first.seed.isdecimal() and first.seed != second.seed
    # The reported seed reproduces the image: the requester can regenerate it.
    assert webp(cache.generate(MODEL, make_job(seed=first.seed))) == webp(first)


def test_text_seeds_are_deterministic(cache: ModelCache) -> None:
    assert seed_to_int("a cat") == seed_to_int("a cat") != seed_to_int("a dog")
    assert seed_to_int("42") == 42
    first = cache.generate(MODEL, make_job(seed="a cat"))
    assert first.seed == "a cat"
    assert webp(first) == webp(cache.generate(MODEL, make_job(seed="a cat")))


def test_the_negative_prompt_and_clip_skip_change_the_image(cache: ModelCache) -> None:
    base = webp(cache.generate(MODEL, make_job()))
    assert base != webp(cache.generate(MODEL, make_job(negative="")))
    assert base != webp(cache.generate(MODEL, make_job(clip_skip=2)))


def test_the_samplers_are_the_apis_samplers() -> None:
    assert set(SAMPLERS) == SAMPLER_NAMES


@pytest.mark.parametrize("sampler", sorted(SAMPLER_NAMES))
def test_every_sampler_runs_and_repeats_itself(cache: ModelCache, sampler: str) -> None:
    for karras in (False, True):
        job = make_job(sampler_name=sampler, karras=karras, steps=3, seed="5")
        first = webp(cache.generate(MODEL, job))
        assert decode_webp(first).size == (64, 64)
        assert first == webp(cache.generate(MODEL, job)), f"{sampler} karras={karras} is not deterministic"


def test_an_unknown_sampler_fails_the_job_instead_of_falling_back(cache: ModelCache) -> None:
    with pytest.raises(GenerationError, match="unknown sampler 'k_nope'"):
        cache.generate(MODEL, make_job(sampler_name="k_nope"))


def test_karras_sigmas_change_the_image(cache: ModelCache) -> None:
    plain = webp(cache.generate(MODEL, make_job(sampler_name="k_dpmpp_2m", karras=False)))
    assert plain != webp(cache.generate(MODEL, make_job(sampler_name="k_dpmpp_2m", karras=True)))


def test_a_sampler_changes_the_image_but_not_the_cached_scheduler(cache: ModelCache) -> None:
    euler = webp(cache.generate(MODEL, make_job(sampler_name="k_euler")))
    ddim = webp(cache.generate(MODEL, make_job(sampler_name="ddim")))
    assert euler != ddim
    assert type(cache.get(MODEL).pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # type: ignore[union-attr]


def _difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b.convert(a.mode), dtype=np.float32)).mean())


@pytest.mark.parametrize("model", [MODEL, "tiny-xl"])
def test_img2img_starts_from_the_source_and_follows_denoising_strength(cache: ModelCache, model: str) -> None:
    source = Image.new("RGB", (96, 96), (200, 120, 40))  # resized to the job's size
    light = cache.generate(model, make_job(processing="img2img", source=png(source), denoising_strength=0.2,
                                           steps=10))
    heavy = cache.generate(model, make_job(processing="img2img", source=png(source), denoising_strength=1.0,
                                           steps=10))
    assert light.image.size == heavy.image.size == (64, 64)
    assert light.megapixelsteps == pytest.approx(64 * 64 * 2 / 1e6)  # 20% of 10 steps
    reference = source.resize((64, 64))
    assert webp(light) != webp(heavy)
    assert _difference(reference, light.image) != _difference(reference, heavy.image)
    assert webp(light) == webp(cache.generate(model, make_job(processing="img2img", source=png(source),
                                                              denoising_strength=0.2, steps=10)))


def test_the_inpainting_mask_is_the_given_mask_or_the_transparent_pixels() -> None:
    source = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    source.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent
    from_alpha = prepare_image(make_job(processing="inpainting", source=png(source)))
    assert from_alpha.mask is not None and from_alpha.source is not None
    assert from_alpha.mask.getpixel((5, 5)) == 255 and from_alpha.mask.getpixel((50, 5)) == 0
    assert from_alpha.source.mode == "RGB"
    mask = Image.new("L", (64, 64), 0)
    given = prepare_image(make_job(processing="inpainting", source=png(source), mask=png(mask)))
    assert given.mask is not None and given.mask.getextrema() == (0, 0)
    with pytest.raises(GenerationError, match="source_mask or a source_image with transparent"):
        prepare_image(make_job(processing="inpainting", source=png(source.convert("RGB"))))
    with pytest.raises(GenerationError, match="not a readable image"):
        prepare_image(make_job(processing="img2img", source=b"not an image"))


@pytest.mark.parametrize("model", [MODEL, "tiny-xl"])
def test_inpainting_runs(cache: ModelCache, model: str) -> None:
    source = Image.new("RGBA", (64, 64), (10, 200, 30, 255))
    source.paste((0, 0, 0, 0), (0, 0, 32, 64))
    job = make_job(processing="inpainting", source=png(source), steps=4)
    result = cache.generate(model, job, prepared=prepare_image(job))
    assert result.image.size == (64, 64)
    img2img = cache.generate(model, make_job(processing="img2img", source=png(source), steps=4))
    assert webp(result) != webp(img2img)


# --- the safety checker ----------------------------------------------------------------------------


def test_the_safety_checker_is_loaded_once_and_measured(cache: ModelCache, models_dir: Path) -> None:
    assert cache.safety is not None and cache.safety.source == models_dir / MODEL
    assert cache.safety.memory_bytes == sum(p.numel() * 4 for p in cache.safety.checker.parameters()) + sum(
        b.numel() * b.element_size() for b in cache.safety.checker.buffers())


@pytest.mark.parametrize(("nsfw", "censor_nsfw"), [(False, False), (True, True), (False, True)])
def test_flagged_images_are_blacked_out_when_the_job_censors(flagging: ModelCache, nsfw: bool,
                                                             censor_nsfw: bool) -> None:
    result = flagging.generate(MODEL, make_job(nsfw=nsfw, censor_nsfw=censor_nsfw))
    assert result.censored
    assert black(decode_webp(webp(result)))
    assert read_metadata(webp(result))["censored"] is True


def test_the_checker_is_skipped_for_nsfw_jobs_on_nsfw_workers(flagging: ModelCache) -> None:
    result = flagging.generate(MODEL, make_job(nsfw=True, censor_nsfw=False))
    assert not result.censored and not black(result.image)


def test_a_censorlist_word_switches_the_censor_on(flagging: ModelCache) -> None:
    assert flagging.generate(MODEL, make_job(prompt="a LIGHTHOUSE at dusk")).censored
    assert not flagging.generate(MODEL, make_job(prompt="lighthouses at dusk")).censored  # whole words
    assert not flagging.generate(MODEL, make_job(prompt="a harbour", negative="lighthouse")).censored


def test_a_worker_that_censors_checks_every_image(models_dir: Path) -> None:
    strict = ModelCache({MODEL: models_dir / "tiny-nsfw-sd"}, device="cpu", progress=False,
                        policy=Policy(nsfw=False, censor_style="blur"))
    strict.start()
    result = strict.generate(MODEL, make_job(nsfw=True))
    assert result.censored and not black(result.image)  # blurred, not black
    assert result.image.size == (64, 64)


def test_censoring_without_a_checker(image_models: dict[str, Any], tmp_path: Path) -> None:
    no_checker = {"tiny-xl": image_models["tiny-xl"]}  # SDXL ships no safety checker
    lenient = ModelCache(no_checker, device="cpu", progress=False)
    lenient.start()
    assert lenient.safety is None
    assert lenient.refusal("tiny-xl", make_job(nsfw=False)) == \
        "the job must be censored and this worker has no safety checker"
    # A job that may be NSFW is fine, for the model it asked for (not for another one).
    assert lenient.refusal("tiny-xl", make_job(nsfw=True).model_copy(update={"models": ["tiny-xl"]})) is None
    assert lenient.refusal("tiny-xl", make_job(nsfw=True)) == "model 'tiny-xl' was not requested"
    with pytest.raises(GenerationError, match="no safety checker"):
        lenient.generate("tiny-xl", make_job(nsfw=False))
    strict = ModelCache(no_checker, device="cpu", progress=False, policy=Policy(nsfw=False))
    with pytest.raises(ModelLoadError, match="censors .* but has no safety checker"):
        strict.start()


def test_blurred_replacements_hide_the_image() -> None:
    image = Image.effect_noise((64, 64), 100).convert("RGB")
    blurred = censor_image(image, "blur")
    assert blurred.size == image.size and not black(blurred)
    assert np.asarray(blurred, dtype=np.float32).std() < np.asarray(image, dtype=np.float32).std() / 4


# --- what a worker takes -----------------------------------------------------------------------------


def test_jobs_this_worker_cannot_do_are_refused_before_claiming(image_models: dict[str, Any]) -> None:
    picky = ModelCache({MODEL: image_models[MODEL]}, device="cpu", progress=False,
                       policy=Policy(max_pixels=64 * 64, allow_img2img=False, allow_painting=False))
    assert picky.refusal(MODEL, make_job()) is None
    assert "max_pixels" in (picky.refusal(MODEL, make_job(width=128)) or "")
    source = png(Image.new("RGBA", (64, 64)))
    assert "img2img" in (picky.refusal(MODEL, make_job(processing="img2img", source=source)) or "")
    assert "inpainting" in (picky.refusal(MODEL, make_job(processing="inpainting", source=source)) or "")
    assert "not served" in (picky.refusal("other", make_job()) or "")


def test_devices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="not available"):
            resolve_device("cuda")


def test_an_unknown_model_is_refused(cache: ModelCache) -> None:
    with pytest.raises(ModelLoadError, match="does not serve"):
        cache.get("stable_diffusion")


@pytest.fixture
def lru(image_models: dict[str, Any]) -> Iterator[ModelCache]:
    sd, xl = image_models[MODEL], image_models["tiny-xl"]
    budget = max(sd.bytes_at(4), xl.bytes_at(4)) + 1  # room for one at a time
    yield ModelCache({MODEL: sd, "tiny-xl": xl}, device="cpu", progress=False, memory_budget=budget)


def test_the_lru_keeps_what_fits_and_drops_the_least_recently_used(lru: ModelCache) -> None:
    lru.start()
    assert lru.loaded == [MODEL]  # the second waits for its first job
    result = lru.generate("tiny-xl", make_job())
    assert result.image.size == (64, 64)
    assert lru.loaded == ["tiny-xl"]
    lru.generate(MODEL, make_job())
    assert lru.loaded == [MODEL]


def test_a_job_larger_than_memory_is_faulted_and_the_next_one_runs(cache: ModelCache) -> None:
    # A real failed allocation: the initial latents alone would take 275 GB (the API's size
    # limits would refuse such a job; a worker must survive whatever reaches it).
    with pytest.raises(GenerationError, match="out of cpu memory generating with tiny-sd"):
        cache.generate(MODEL, make_job(width=2**20, height=2**20, steps=1))
    assert cache.generate(MODEL, make_job()).image.size == (64, 64)


def test_a_model_larger_than_the_budget_is_a_start_up_error(image_models: dict[str, Any]) -> None:
    tight = ModelCache({MODEL: image_models[MODEL]}, device="cpu", progress=False, memory_budget=1000)
    with pytest.raises(ModelLoadError, match=r"'tiny-sd' does not fit in memory: it needs 1\.16 MiB in "
                                             r"torch.float32 and this worker may use 0\.00 MiB of cpu memory"):
        tight.start()
