"""Generating text with the tiny real GPT-2, through the worker's own code: max_length, the
context cut, stop sequences, sampling parameters and seeds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from broker.messages import JobMessage, TextParams
from consumers.cache import ModelCache, Policy
from consumers.errors import ModelLoadError
from consumers.sources import ModelFormat, find_model, inspect_model
from consumers.text import GeneratedText, TextModel, cut_at_stop, prompt_budget

MODEL = "tiny-gpt2"
PROMPT = "Once upon a time, in a lighthouse by the sea, "


def make_job(prompt: str = PROMPT, **params: Any) -> JobMessage:
    defaults: dict[str, Any] = {"max_length": 16, "seed": 1}
    return JobMessage(job_id="text-1", request_id="req-1", kind="text", models=[MODEL], prompt=prompt,
                      params=TextParams(**{**defaults, **params}), tier=0, created_at=datetime.now(UTC))


@pytest.fixture(scope="module")
def cache(models_dir: Path) -> ModelCache:
    torch.set_num_threads(1)
    cache = ModelCache({MODEL: find_model(MODEL, "text", models_dir, baseline="gpt2")}, device="cpu", progress=False)
    cache.start()
    return cache


def generate(cache: ModelCache, job: JobMessage, seed: str | None = None) -> GeneratedText:
    result = cache.generate(MODEL, job, seed=seed)
    assert isinstance(result, GeneratedText)
    return result


def test_loads_a_transformers_folder_of_safetensors_with_sdpa(cache: ModelCache) -> None:
    model = cache.get(MODEL)
    assert isinstance(model, TextModel) and model.source.format is ModelFormat.transformers
    assert model.model.config._attn_implementation == "sdpa"
    assert model.model.dtype == torch.float32 and model.max_positions == 1024
    assert cache.safety is None  # text models need no safety checker


def test_max_length_new_tokens(cache: ModelCache) -> None:
    for length in (1, 7, 40):
        result = generate(cache, make_job(max_length=length))
        assert result.tokens == length  # the tiny model never ends early (its EOS is suppressed)
        assert result.stopped_by is None


def test_same_seed_same_text_other_seed_other_text(cache: ModelCache) -> None:
    first = generate(cache, make_job(seed=11))
    assert first.seed == "11"
    assert first.text == generate(cache, make_job(seed=11)).text
    assert first.text != generate(cache, make_job(seed=12)).text
    assert generate(cache, make_job(seed=11), seed="12").text == generate(cache, make_job(seed=12)).text


def test_a_random_seed_is_chosen_and_reported(cache: ModelCache) -> None:
    first = generate(cache, make_job(seed=None))
    assert first.seed.isdecimal()
    assert generate(cache, make_job(seed=int(first.seed))).text == first.text


def test_the_prompt_is_cut_from_the_left_to_fit_the_context(cache: ModelCache) -> None:
    digits = "0123456789" * 30  # one token per digit: no merges apply
    cut = generate(cache, make_job(prompt=digits, max_length=8, max_context_length=8 + 10))
    assert cut.prompt_tokens == 10
    tail = generate(cache, make_job(prompt=digits[-10:], max_length=8, max_context_length=1024))
    assert tail.prompt_tokens == 10 and cut.text == tail.text
    whole = generate(cache, make_job(prompt=digits, max_length=8, max_context_length=1024))
    assert whole.prompt_tokens == 300 and whole.text != cut.text


def test_the_context_never_leaves_less_than_one_prompt_token() -> None:
    assert prompt_budget(max_context_length=80, max_length=200, max_positions=None) == 1
    assert prompt_budget(max_context_length=4096, max_length=100, max_positions=1024) == 924


def test_a_stop_sequence_ends_the_text_before_it(cache: ModelCache) -> None:
    full = generate(cache, make_job(max_length=60, seed=5))
    stop = next(c for c in full.text[3:] if c.isascii() and c.isprintable() and not c.isspace())
    stopped = generate(cache, make_job(max_length=60, seed=5, stop_sequence=["never-there", stop]))
    assert stopped.stopped_by == stop
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.tokens < 60  # it stopped generating, not just cut the text


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("abc\nUser: hi\nBot:", ["Bot:", "\nUser:"]) == ("abc", "\nUser:")
    assert cut_at_stop("abc", ["x"]) == ("abc", None)


def test_sampling_parameters_apply(cache: ModelCache) -> None:
    greedy = generate(cache, make_job(temperature=0, seed=1)).text
    assert generate(cache, make_job(temperature=0, seed=2)).text == greedy  # no sampling: seed is moot
    assert generate(cache, make_job(temperature=1.0, top_k=1, rep_pen=1.1, seed=3)).text == greedy
    sampled = generate(cache, make_job(temperature=1.0, top_k=0, top_p=1.0, seed=3)).text
    assert sampled != greedy
    # A random model's logits are close together: a strong repetition penalty changes the choice.
    unpenalised = generate(cache, make_job(temperature=0, rep_pen=1.0, max_length=40)).text
    assert generate(cache, make_job(temperature=0, rep_pen=3.0, max_length=40)).text != unpenalised


def test_text_jobs_over_the_workers_limits_are_refused(models_dir: Path) -> None:
    source = find_model(MODEL, "text", models_dir, baseline="gpt2")
    small = ModelCache({MODEL: source}, device="cpu", progress=False, policy=Policy(max_length=32,
                                                                                     max_context_length=512))
    assert small.refusal(MODEL, make_job(max_length=32, max_context_length=512)) is None
    assert "max_length 33" in (small.refusal(MODEL, make_job(max_length=33, max_context_length=512)) or "")
    assert "max_context_length 1024" in (small.refusal(MODEL, make_job()) or "")


def test_pickled_weights_are_refused_unless_allowed(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in (models_dir / MODEL).iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickled")
    with pytest.raises(ModelLoadError, match="pickled weights can run arbitrary code.*--allow-pickle"):
        inspect_model(MODEL, folder, kind="text")
    assert inspect_model(MODEL, folder, kind="text", allow_pickle=True).pickled
