"""The worker's CUDA path on a real GPU, through its own ModelCache: device and precision choice,
loading every model format, every sampler, img2img, inpainting, the safety checker, seeds, text,
the memory budget, eviction, running out of memory at load and at generation, and how fast it
generates.

There is no model hub here (nor on a lent GPU machine), so the models are built from configs with
seeded random weights (``consumers.tiny``): the tests' tiny ones, and Stable Diffusion 1.5's, SDXL's
and GPT-2 medium's own sizes. Random weights draw noise, but the GPU does the same work as for the
trained model (same shapes, same kernels), so the timings stand for the real ones.

    python bench/gpu_worker.py --json /tmp/gpu.json

Each check prints ok or FAIL with what it measured; the exit status is 1 if any failed. Needs a
CUDA GPU; about 3 minutes on an H200, models built included (SDXL's take 35 s there).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from broker.messages import ImageParams, JobMessage, TextParams  # noqa: E402
from consumers.cache import ModelCache, Policy  # noqa: E402
from consumers.devices import GIB, resolve_device  # noqa: E402
from consumers.errors import GenerationError, ModelLoadError  # noqa: E402
from consumers.pipelines import GeneratedImage, ImageModel, encode_webp  # noqa: E402
from consumers.samplers import SAMPLERS  # noqa: E402
from consumers.sources import find_model  # noqa: E402
from consumers.text import GeneratedText, TextModel  # noqa: E402
from consumers.tiny import (  # noqa: E402
    GPT2_MEDIUM,
    SD15,
    SDXL,
    build_tiny_gpt2,
    build_tiny_sd,
    build_tiny_sdxl,
    build_tiny_single_file,
)

log = logging.getLogger("bench.gpu_worker")


@dataclass
class Report:
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            figures = check()
            self.checks[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 2), **figures}
            print(f"ok   {name}: {json.dumps(figures)}", flush=True)
        except Exception as exc:  # a failed check is reported and the others still run
            self.checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks.values())


def image_job(model: str, *, processing: str = "txt2img", source: bytes | None = None, nsfw: bool = True,
              **params: Any) -> JobMessage:
    defaults: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7.5,
                                "sampler_name": "k_euler", "karras": False, "seed": "1234"}
    return JobMessage(job_id=f"gpu-{time.monotonic_ns()}", request_id="req", kind="image", models=[model],
                      prompt="a lighthouse at dusk", negative_prompt="blurry",
                      params=ImageParams(**{**defaults, **params}), nsfw=nsfw, tier=0,
                      created_at=datetime.now(UTC), source_processing=processing, source_image=source)


def text_job(model: str, **params: Any) -> JobMessage:
    return JobMessage(job_id=f"gpu-{time.monotonic_ns()}", request_id="req", kind="text", models=[model],
                      prompt="Once upon a time, in a lighthouse by the sea, ",
                      params=TextParams(**{"max_length": 16, "seed": 1, **params}), tier=0,
                      created_at=datetime.now(UTC))


def pixels(result: Any) -> np.ndarray:
    assert isinstance(result, GeneratedImage), result
    return np.asarray(result.image.convert("RGB"), dtype=np.int16)


def drawn(result: Any, size: tuple[int, int]) -> np.ndarray:
    """The image's pixels, checked: the asked size, and not flat (fp16 overflow gives NaN → black)."""
    array = pixels(result)
    assert result.image.size == size, result.image.size
    assert array.std() > 1.0, f"a flat image (std {array.std():.2f}): NaN or overflow in half precision?"
    return array


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def limit_memory_to(nbytes: int) -> None:
    """Let this process allocate ``nbytes`` in all: a real CUDA out-of-memory beyond that."""
    torch.cuda.empty_cache()  # the limit counts memory the allocator keeps in reserve, too
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total))


# --- the checks ----------------------------------------------------------------------------------


def check_device() -> dict[str, Any]:
    device = resolve_device("auto")
    assert device.type == "cuda", device
    cache = ModelCache({}, device="auto", progress=False)
    assert cache.dtype("image") is torch.float16, cache.dtype("image")
    assert cache.dtype("text") is torch.bfloat16, cache.dtype("text")
    free, total = torch.cuda.mem_get_info()
    assert 0.85 * free <= cache.memory_budget <= 0.95 * free, (cache.memory_budget, free)
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "total_gib": round(total / GIB, 1),
            "budget_gib": round(cache.memory_budget / GIB, 1)}


def check_tiny_formats(cache: ModelCache) -> dict[str, Any]:
    loaded = {}
    for name in cache.models:
        if cache.sources[name].kind != "image":
            continue
        result = cache.generate(name, image_job(name))
        drawn(result, (64, 64))
        model = cache.get(name)
        assert isinstance(model, ImageModel)
        unet = model.pipe.unet
        assert unet.device.type == "cuda" and unet.dtype is torch.float16, (unet.device, unet.dtype)
        loaded[name] = cache.sources[name].format.value
    return {"formats": loaded}


def check_samplers(cache: ModelCache) -> dict[str, Any]:
    for sampler in SAMPLERS:
        for karras in (False, True):
            drawn(cache.generate("tiny-sd", image_job("tiny-sd", sampler_name=sampler, karras=karras)), (64, 64))
    return {"samplers": len(SAMPLERS)}


def check_seeds(cache: ModelCache) -> dict[str, Any]:
    first = pixels(cache.generate("tiny-sd", image_job("tiny-sd", seed="42")))
    again = pixels(cache.generate("tiny-sd", image_job("tiny-sd", seed="42")))
    other = pixels(cache.generate("tiny-sd", image_job("tiny-sd", seed="43")))
    assert np.array_equal(first, again), "the same seed drew another image on CUDA"
    assert not np.array_equal(first, other), "another seed drew the same image"
    return {}


def check_img2img_and_inpainting(cache: ModelCache) -> dict[str, Any]:
    source = Image.new("RGBA", (64, 64), (10, 200, 30, 255))
    source.paste((0, 0, 0, 0), (0, 0, 32, 64))
    img2img = drawn(cache.generate("tiny-sd", image_job("tiny-sd", processing="img2img", source=png(source),
                                                        denoising_strength=0.5, steps=8)), (64, 64))
    painted = pixels(cache.generate("tiny-sd", image_job("tiny-sd", processing="inpainting", source=png(source),
                                                         steps=8)))
    assert painted.shape == (64, 64, 3) and not np.array_equal(img2img, painted)
    return {}


def check_safety_checker(models: Path) -> dict[str, Any]:
    strict = ModelCache({"tiny-nsfw-sd": models / "tiny-nsfw-sd"}, device="cuda", progress=False,
                        policy=Policy(nsfw=False))
    strict.start()
    assert strict.safety is not None
    result = strict.generate("tiny-nsfw-sd", image_job("tiny-nsfw-sd", nsfw=True))
    assert isinstance(result, GeneratedImage) and result.censored and pixels(result).max() == 0
    return {"safety_dtype": str(strict.safety.dtype)}


def check_tiny_text(cache: ModelCache) -> dict[str, Any]:
    model = cache.get("tiny-gpt2")
    assert isinstance(model, TextModel) and model.model.dtype is torch.bfloat16 and model.device.type == "cuda"
    first = cache.generate("tiny-gpt2", text_job("tiny-gpt2", max_length=24, seed=7))
    again = cache.generate("tiny-gpt2", text_job("tiny-gpt2", max_length=24, seed=7))
    assert isinstance(first, GeneratedText) and isinstance(again, GeneratedText)
    assert first.tokens == 24 and first.text == again.text
    return {}


def loaded_as_needed(cache: ModelCache, name: str) -> tuple[Any, float]:
    """Load ``name``; the VRAM it then holds must be its need read from the file headers (within 5%)."""
    before = allocated()
    started = time.perf_counter()
    model = cache.get(name)
    load = time.perf_counter() - started
    held = allocated() - before
    assert abs(held - model.memory_bytes) < 0.05 * model.memory_bytes, (held, model.memory_bytes)
    assert abs(cache.need(name) - model.memory_bytes) < 0.05 * model.memory_bytes, (cache.need(name), held)
    return model, load


def timed_images(cache: ModelCache, job: JobMessage, runs: int) -> tuple[list[float], GeneratedImage]:
    """One warm-up (kernels chosen, memory pooled), then ``runs`` timed generations of ``job``;
    the peak VRAM counted from the first timed one."""
    name, size = job.models[0], (job.image_params.width, job.image_params.height)
    drawn(cache.generate(name, job), size)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = cache.generate(name, job)
        times.append(time.perf_counter() - started)
    drawn(result, size)
    assert isinstance(result, GeneratedImage)
    return times, result


def check_sd15(cache: ModelCache, runs: int) -> dict[str, Any]:
    model, load = loaded_as_needed(cache, "sd15")
    figures: dict[str, Any] = {"load_s": round(load, 2), "vram_gib": round(model.memory_bytes / GIB, 2)}
    for _ in range(3):  # an idle GPU runs at a fraction of its clock until work has kept it busy
        cache.generate("sd15", image_job("sd15", width=512, height=512, steps=20))
    for width, steps in ((512, 20), (768, 20), (1024, 20)):
        times, result = timed_images(cache, image_job("sd15", width=width, height=width, steps=steps), runs)
        started = time.perf_counter()
        encoded = encode_webp(result.image, result.metadata)  # the worker's CPU step after each image
        figures[f"{width}px_{steps}steps"] = {
            "s_per_image_median": round(float(np.median(times)), 3), "s_per_image_min": round(min(times), 3),
            "steps_per_s": round(steps / float(np.median(times)), 1),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "webp_ms": round(1000 * (time.perf_counter() - started), 1), "webp_kib": len(encoded) // 1024}
    figures["512px_20steps"].update(_sd15_beside(cache, model, runs))
    return figures


def _sd15_beside(cache: ModelCache, model: Any, runs: int) -> dict[str, float]:
    """512 px, 20 steps two more ways: diffusers' own call on the same pipeline (what the worker's
    wrapping costs), and the worker's while another thread encodes WebP as its encoder does
    between jobs (what that overlap costs the GPU)."""
    job = image_job("sd15", width=512, height=512, steps=20)
    bare = []
    for _ in range(runs):
        started = time.perf_counter()
        with torch.inference_mode():
            model.pipe(prompt=job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=20,
                       guidance_scale=7.5, width=512, height=512,
                       generator=torch.Generator("cuda").manual_seed(1), output_type="pil")
        bare.append(time.perf_counter() - started)
    image = cache.generate("sd15", job)
    stop = threading.Event()

    def encode() -> None:
        while not stop.is_set():
            encode_webp(image.image, image.metadata)

    encoder = threading.Thread(target=encode)
    encoder.start()
    try:
        beside = []
        for _ in range(runs):
            started = time.perf_counter()
            cache.generate("sd15", job)
            beside.append(time.perf_counter() - started)
    finally:
        stop.set()
        encoder.join()
    return {"diffusers_alone_s": round(float(np.median(bare)), 3),
            "while_encoding_webp_s": round(float(np.median(beside)), 3)}


def check_sdxl(cache: ModelCache, runs: int) -> dict[str, Any]:
    """SDXL 1.0's sizes at its native 1024x1024: two text encoders, micro-conditioning, and a VAE
    that diffusers runs in fp32 (``force_upcast``) since SDXL's overflows fp16."""
    model, _ = loaded_as_needed(cache, "sdxl")
    times, _ = timed_images(cache, image_job("sdxl", width=1024, height=1024, steps=20), runs)
    median = float(np.median(times))
    return {"vram_gib": round(model.memory_bytes / GIB, 2), "1024px_20steps_s_median": round(median, 3),
            "steps_per_s": round(20 / median, 1),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}


def check_gpt2_medium(cache: ModelCache, runs: int) -> dict[str, Any]:
    model = cache.get("gpt2-medium")
    assert isinstance(model, TextModel) and model.model.dtype is torch.bfloat16
    job = text_job("gpt2-medium", max_length=256)
    cache.generate("gpt2-medium", job)
    rates = []
    for _ in range(runs):
        result = cache.generate("gpt2-medium", job)
        assert isinstance(result, GeneratedText) and result.tokens == 256
        rates.append(result.tokens / result.seconds)
    greedy = cache.generate("gpt2-medium", text_job("gpt2-medium", max_length=256, temperature=0, rep_pen=1.0))
    assert isinstance(greedy, GeneratedText)
    ids = torch.tensor([model.tokenizer(job.prompt).input_ids], device="cuda")
    started = time.perf_counter()
    with torch.inference_mode():  # transformers' own call, greedy: what the worker's wrapping costs
        model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=256,
                             min_new_tokens=256, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    bare = 256 / (time.perf_counter() - started)
    return {"tokens_per_s_median": round(float(np.median(rates)), 1), "vram_gib": round(model.memory_bytes / GIB, 2),
            "greedy_tokens_per_s": round(greedy.tokens / greedy.seconds, 1),
            "transformers_alone_greedy_tokens_per_s": round(bare, 1)}


def check_eviction(sources: dict[str, Any]) -> dict[str, Any]:
    """A budget with room for one of the two big models: the other's turn drops it, and its VRAM
    goes back to the device."""
    pair = {"sd15": sources["sd15"], "gpt2-medium": sources["gpt2-medium"]}
    probe = ModelCache(pair, device="cuda", progress=False)
    budget = max(probe.need(n) for n in pair) + GIB // 4
    lru = ModelCache(pair, device="cuda", progress=False, memory_budget=budget)
    baseline = allocated()
    lru.generate("sd15", image_job("sd15", width=512, height=512, steps=2))
    with_sd = allocated()
    lru.generate("gpt2-medium", text_job("gpt2-medium"))
    assert lru.loaded == ["gpt2-medium"], lru.loaded
    with_text = allocated()
    text_bytes = lru.need("gpt2-medium")
    assert with_text - baseline < text_bytes * 1.1, (with_text - baseline, text_bytes)
    reserved = torch.cuda.memory_reserved()
    return {"sd15_held_gib": round((with_sd - baseline) / GIB, 2),
            "after_drop_gib": round((with_text - baseline) / GIB, 2), "reserved_gib": round(reserved / GIB, 2)}


def check_budget_refusal(sources: dict[str, Any]) -> dict[str, Any]:
    tight = ModelCache({"sd15": sources["sd15"]}, device="cuda", progress=False, memory_budget=GIB)
    try:
        tight.start()
    except ModelLoadError as exc:
        assert "does not fit in memory" in str(exc) and "of cuda memory" in str(exc), exc
        return {"message": str(exc)}
    raise AssertionError("a 1 GiB budget took SD 1.5")


def check_oom_at_load(sources: dict[str, Any], models: Path) -> dict[str, Any]:
    """The budget says it fits but the device has no room (another program took it): a clear
    ModelLoadError, the partly moved weights freed, and the worker still serves what fits."""
    baseline = allocated()
    cache = ModelCache({"sd15": sources["sd15"], "tiny-sd": models / "tiny-sd"}, device="cuda", progress=False,
                       memory_budget=100 * GIB)
    limit_memory_to(baseline + GIB)
    try:
        cache.get("sd15")
        raise AssertionError("SD 1.5 loaded into 1 GiB")
    except ModelLoadError as exc:
        assert "does not fit in cuda" in str(exc), exc
        message = str(exc).splitlines()[0][:160]
    leftover = allocated() - baseline
    assert leftover < 64 * 1024**2, f"{leftover} bytes left on the GPU after the failed load"
    drawn(cache.generate("tiny-sd", image_job("tiny-sd")), (64, 64))
    return {"message": message, "leftover_mib": round(leftover / 1024**2, 1)}


def check_oom_at_generation(cache: ModelCache) -> dict[str, Any]:
    """A job too large for the room left: GenerationError (the worker reports the job faulted), its
    activations freed, and the next job runs."""
    cache.get("sd15")
    limit_memory_to(allocated() + GIB // 2)
    try:
        cache.generate("sd15", image_job("sd15", width=2048, height=2048, steps=2))
        raise AssertionError("a 2048x2048 SD 1.5 image fitted in 0.5 GiB of activations")
    except GenerationError as exc:
        assert "out of cuda memory" in str(exc), exc
        message = str(exc)
    torch.cuda.set_per_process_memory_fraction(1.0)
    drawn(cache.generate("sd15", image_job("sd15", width=512, height=512, steps=4)), (512, 512))
    return {"message": message, "reserved_after_gib": round(torch.cuda.memory_reserved() / GIB, 2)}


# --- the run -------------------------------------------------------------------------------------


def build_models(root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    build_tiny_sd(root / "tiny-sd")
    build_tiny_sd(root / "tiny-nsfw-sd", flag_everything=True)
    build_tiny_sdxl(root / "tiny-xl")
    build_tiny_single_file(root / "tiny-sd", root / "tiny-single.safetensors")
    build_tiny_gpt2(root / "tiny-gpt2")
    build_tiny_sd(root / "sd15", shapes=SD15)
    build_tiny_sdxl(root / "sdxl", shapes=SDXL)
    build_tiny_gpt2(root / "gpt2-medium", sizes=GPT2_MEDIUM)
    (root / "configs").mkdir(exist_ok=True)
    link = root / "configs" / "stable_diffusion_1"
    if not link.exists():
        link.symlink_to(root / "tiny-sd", target_is_directory=True)
    print(f"built the models in {time.perf_counter() - started:.1f}s", flush=True)
    sources = {name: find_model(name, "image", root, baseline="stable_diffusion_1")
               for name in ("tiny-sd", "tiny-single", "sd15")}
    for name in ("tiny-xl", "sdxl"):
        sources[name] = find_model(name, "image", root, baseline="stable_diffusion_xl")
    for name in ("tiny-gpt2", "gpt2-medium"):
        sources[name] = find_model(name, "text", root, baseline="gpt2")
    return sources


def _tiny_checks(report: Report, root: Path, sources: dict[str, Any]) -> None:
    tiny = ModelCache({n: sources[n] for n in ("tiny-sd", "tiny-xl", "tiny-single", "tiny-gpt2")},
                      device="cuda", progress=False, safety_folder=root / "tiny-sd")
    report.run("load every format on cuda in fp16", partial(check_tiny_formats, tiny))
    report.run("every sampler, with and without karras", partial(check_samplers, tiny))
    report.run("seeds reproduce on cuda", partial(check_seeds, tiny))
    report.run("img2img and inpainting", partial(check_img2img_and_inpainting, tiny))
    report.run("safety checker on cuda", partial(check_safety_checker, root))
    report.run("text in bf16", partial(check_tiny_text, tiny))


def _full_size_checks(report: Report, sources: dict[str, Any], runs: int) -> None:
    big = ModelCache({n: sources[n] for n in ("sd15", "sdxl", "gpt2-medium")}, device="cuda")
    report.run("SD 1.5 sizes: load and generate", partial(check_sd15, big, runs))
    report.run("SDXL sizes: load and generate", partial(check_sdxl, big, runs))
    report.run("GPT-2 medium sizes: tokens per second", partial(check_gpt2_medium, big, runs))
    report.run("out of memory while generating", partial(check_oom_at_generation, big))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="where to build the models (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per size (default 5)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        print("error: no CUDA GPU here: this benchmark runs the worker's CUDA path", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = args.models or Path(tmp)
        report = Report()
        report.run("device and precision", check_device)
        sources = build_models(root)
        _tiny_checks(report, root, sources)
        _full_size_checks(report, sources, args.runs)
        torch.cuda.empty_cache()
        report.run("the LRU drops a model and frees its VRAM", partial(check_eviction, sources))
        report.run("a model over the budget is a start-up error", partial(check_budget_refusal, sources))
        report.run("out of memory while loading", partial(check_oom_at_load, sources, root))
    if args.json:
        args.json.write_text(json.dumps(report.checks, indent=2) + "\n", encoding="utf-8")
    failed = [name for name, c in report.checks.items() if not c["ok"]]
    print(f"{len(report.checks) - len(failed)} of {len(report.checks)} checks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
