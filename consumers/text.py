"""Text models: a transformers causal LM loaded from a safetensors folder, and generating one text
per job with KoboldAI's parameters, as AI Horde's text API passes them.

- ``max_length``: new tokens to generate at most (fewer if the model ends its text or a stop
  sequence appears);
- ``max_context_length``: the tokens the model sees, prompt and generation together, as in
  KoboldAI. The prompt keeps its last ``max_context_length - max_length`` tokens (at least one):
  it is cut from the left, where the oldest story text is. The model's own position limit cuts
  further if it is smaller;
- ``temperature`` (0: greedy), ``top_p`` (1: off), ``top_k`` (0: off), ``rep_pen`` (1: off);
- ``stop_sequence``: generation stops once one appears, and the text is cut just before the
  first one (the stop sequence itself is not returned, as KoboldCpp does);
- ``seed``: sampling is seeded, so a seed gives the same text again on the same worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from broker.messages import JobMessage
from consumers.devices import is_out_of_memory, module_bytes
from consumers.errors import ModelLoadError
from consumers.sources import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedText:
    text: str
    seed: str
    seconds: float
    tokens: int  # new tokens generated (before the cut at a stop sequence)
    prompt_tokens: int  # prompt tokens the model saw, after the context cut
    stopped_by: str | None = None  # the stop sequence that ended it, if any
    censored: bool = False


class TextModel:
    kind = "text"

    def __init__(self, source: ModelSource, model: Any, tokenizer: Any) -> None:
        self.source = source
        self.model = model
        self.tokenizer = tokenizer
        self.memory_bytes = module_bytes(model)
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_positions: int | None = positions

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def device(self) -> torch.device:
        return self.model.device


def load_text_model(source: ModelSource, *, device: torch.device, dtype: torch.dtype,
                    progress: bool = True) -> TextModel:
    """Load the transformers folder ``source`` onto ``device`` in ``dtype`` with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with tqdm(total=2, desc=f"Loading {source.name}", unit="part", disable=not progress) as bar:
            tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
            bar.update()
            model, info = AutoModelForCausalLM.from_pretrained(
                source.path, local_files_only=True, use_safetensors=not source.pickled, dtype=dtype,
                attn_implementation="sdpa", output_loading_info=True)
            bar.update()
        model = model.to(device).eval()
    except ModelLoadError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ModelLoadError(f"{source.name} does not fit in {device} memory: {exc}") from exc
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"cannot load {source.describe()}: {type(exc).__name__}: {first_line}") from exc
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"{source.path}: weights missing for {missing[:5]}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TextModel(source, model, tokenizer)


def prompt_budget(*, max_context_length: int, max_length: int, max_positions: int | None) -> int:
    """Prompt tokens the model may see: the context left after room for the generation."""
    context = max_context_length if max_positions is None else min(max_context_length, max_positions)
    return max(1, context - max_length)


def generation_room(*, max_length: int, max_positions: int | None) -> int:
    """New tokens allowed: ``max_length``, but never past the model's last position."""
    return max_length if max_positions is None else max(1, min(max_length, max_positions - 1))


def generate_text(model: TextModel, job: JobMessage, *, seed: int) -> GeneratedText:
    """Generate the text ``job`` asks for, seeded with ``seed``."""
    params = job.text_params
    new_tokens = generation_room(max_length=params.max_length, max_positions=model.max_positions)
    budget = prompt_budget(max_context_length=params.max_context_length, max_length=new_tokens,
                           max_positions=model.max_positions)
    ids = model.tokenizer(job.prompt, add_special_tokens=False).input_ids[-budget:]
    if not ids:
        ids = [model.tokenizer.eos_token_id]
    input_ids = torch.tensor([ids], device=model.device)
    stops = [s for s in params.stop_sequence if s]
    sampling: dict[str, Any] = {"do_sample": False}
    if params.temperature > 0:
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k}
    started = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(model.device)), torch.inference_mode():
        torch.manual_seed(seed)
        output = model.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            repetition_penalty=params.rep_pen, pad_token_id=model.tokenizer.pad_token_id,
            stopping_criteria=_stopping(model.tokenizer, len(ids), stops), **sampling)
    seconds = time.perf_counter() - started
    generated = output[0, len(ids):].tolist()
    text, stopped_by = cut_at_stop(model.tokenizer.decode(generated, skip_special_tokens=True), stops)
    log.info("job=%s generated %d tokens after %d prompt tokens seed=%d in %.2fs%s", job.job_id, len(generated),
             len(ids), seed, seconds, f" (stopped by {stopped_by!r})" if stopped_by else "")
    return GeneratedText(text=text, seed=str(seed), seconds=seconds, tokens=len(generated), prompt_tokens=len(ids),
                         stopped_by=stopped_by)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """``text`` up to the earliest stop sequence in it, and that sequence (or None)."""
    found = [(text.find(s), s) for s in stops if s and s in text]
    if not found:
        return text, None
    index, stop = min(found)
    return text[:index], stop


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _stopping(tokenizer: Any, prompt_length: int, stops: list[str]) -> Any:
    """Stop generating once a stop sequence appears in the new text (checked at each token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopSequences(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            text = tokenizer.decode(input_ids[0, prompt_length:], skip_special_tokens=True)
            done = any(s in text for s in stops)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopSequences()] if stops else [])

