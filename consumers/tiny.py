"""Tiny models with seeded random weights, built from configs: Stable Diffusion 1.x and SDXL
pipelines and a GPT-2 causal LM.

Each is a real folder (diffusers or transformers, safetensors weights, the same layout as a
downloaded SD 1.5, SDXL or GPT-2), 0.3 to 1.7 MB, so the demo workers and the tests exercise the
same loading and generation code as real models, offline and on a CPU. Their images are noise
and their texts random bytes: the weights are random. ``build_tiny_single_file`` writes the SD
pipeline as one original-layout checkpoint, for the single-file path.

Shapes follow ``reference/tiny-models.md``: a VAE with four blocks (``vae_scale_factor`` 8, as in
SD 1.x), a CLIP text encoder and UNet of width 32, Euler scheduling, and a safety checker whose
concept weights (2.0, above any cosine score) make it always say "safe" unless tests lower them.

The same builders take other sizes: ``SD15`` and ``GPT2_MEDIUM`` are Stable Diffusion 1.5's and
GPT-2 medium's, for measuring the worker on a GPU (``bench/gpu_worker.py``), where a model's
size, not its weights, decides the time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Components whose weights a complete tiny model has on disk, one safetensors file each.
_WEIGHTED = ("text_encoder", "unet", "vae", "safety_checker")
_WEIGHTED_XL = ("text_encoder", "text_encoder_2", "unet", "vae")
_GPT2_MERGES = (("t", "h"), ("th", "e"), ("Ġ", "t"))
_GPT2_EOS = "<|endoftext|>"
_GPT2_POSITIONS = 1024
_MAX_LENGTH = 77  # CLIP's context; a tokenizer built from files would default to 1e30 (overflow)
_MERGES = (("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"))
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True)
class SdShapes:
    """The sizes of an SD 1.x pipeline's UNet, VAE and CLIP text encoder (keyword arguments of
    their diffusers and transformers classes)."""

    unet: dict[str, Any] = field(default_factory=lambda: {
        "sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32, "attention_head_dim": 4})
    # Four blocks: 8x down-sampling, like SD 1.x.
    vae: dict[str, Any] = field(default_factory=lambda: {
        "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64})
    text: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4})
    text_2: dict[str, Any] | None = None  # SDXL's second text encoder (with projection)


TINY_SD = SdShapes()
# The second encoder is wider than the first, as in SDXL (768 and 1280): diffusers tells the two
# apart by width when it reads a single-file checkpoint.
TINY_SDXL = SdShapes(
    unet={"sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
          "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
          "cross_attention_dim": 32 + 48,  # both text encoders' hidden states, concatenated
          "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
          "addition_time_embed_dim": 8,
          "projection_class_embeddings_input_dim": 6 * 8 + 32},  # six size/crop numbers + pooled text
    text_2={**TINY_SD.text, "hidden_size": 48, "projection_dim": 32},
)
#: Stable Diffusion 1.5's own sizes (UNet 860 M parameters, CLIP ViT-L/14 text encoder): with
#: random weights its images are noise, but a GPU does the same work as for the real model.
SD15 = SdShapes(
    unet={"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
          "norm_num_groups": 32, "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
          "cross_attention_dim": 768, "attention_head_dim": 8},
    vae={"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
         "sample_size": 512},
    text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu"},
)
#: SDXL 1.0's own sizes (UNet 2.6 B parameters; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders).
SDXL = SdShapes(
    unet={"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
          "norm_num_groups": 32, "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
          "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), "transformer_layers_per_block": (1, 2, 10),
          "cross_attention_dim": 768 + 1280, "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
          "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
          "projection_class_embeddings_input_dim": 6 * 256 + 1280},
    vae=SD15.vae,
    text=SD15.text,
    text_2={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
            "hidden_act": "gelu", "projection_dim": 1280},
)
#: GPT-2 sizes: the tiny one, and GPT-2 medium's (355 M parameters, over the tiny vocabulary).
TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4}
GPT2_MEDIUM = {"n_embd": 1024, "n_layer": 24, "n_head": 16}


def build_tiny_sd(path: Path, *, seed: int = 0, flag_everything: bool = False, shapes: SdShapes = TINY_SD) -> Path:
    """Build the tiny pipeline into ``path`` (a diffusers folder) unless a complete one is there.

    The folder is written beside ``path`` and renamed into place, so a crash or a concurrent
    builder never leaves a half-written model that a worker would later try to load.
    ``flag_everything`` gives it a safety checker that flags every image as NSFW. ``shapes=SD15``
    builds the same pipeline at Stable Diffusion 1.5's sizes (for benchmarks on a GPU).
    """
    return _build(Path(path), is_complete,
                  lambda out: _save_pipeline(out, seed=seed, flag_everything=flag_everything, shapes=shapes))


def build_tiny_sdxl(path: Path, *, seed: int = 0, shapes: SdShapes = TINY_SDXL) -> Path:
    """A tiny SDXL pipeline (two text encoders, micro-conditioning UNet), like ``build_tiny_sd``;
    ``shapes=SDXL`` builds it at SDXL 1.0's sizes."""
    return _build(Path(path), lambda p: _complete(p, _WEIGHTED_XL),
                  lambda out: _save_sdxl(out, seed=seed, shapes=shapes))


def build_tiny_gpt2(path: Path, *, seed: int = 0, sizes: dict[str, int] = TINY_GPT2) -> Path:
    """A tiny GPT-2 causal LM in a transformers folder (safetensors, byte-level BPE tokenizer).

    Its generation config suppresses the end-of-text token, so it always writes ``max_length``
    tokens unless a stop sequence ends it: tests can count on the length. ``sizes`` (GPT2Config's
    ``n_embd``, ``n_layer``, ``n_head``) makes a larger one, e.g. ``GPT2_MEDIUM``.
    """
    return _build(Path(path), _gpt2_complete, lambda out: _save_gpt2(out, seed=seed, sizes=sizes))


def build_tiny_single_file(folder: Path, path: Path) -> Path:
    """The tiny SD or SDXL pipeline in ``folder`` as one original-layout ``.safetensors`` checkpoint."""
    import torch

    from consumers.checkpoints import save_original_checkpoint
    from consumers.pipelines import load_pipeline

    if path.is_file():
        return path
    pipe = load_pipeline(Path(folder), device=torch.device("cpu"), progress=False)
    staging = path.with_name(f".{path.name}.tmp")
    save_original_checkpoint(pipe, staging)
    os.replace(staging, path)
    return path


def _build(path: Path, complete: Callable[[Path], bool], save: Callable[[Path], None]) -> Path:
    if complete(path):
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists but is not a complete tiny model; remove it to rebuild")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save(staging / "model")
        (staging / "model").chmod(0o755)  # mkdtemp made the staging tree private; the model is for anyone
        _move_into_place(staging / "model", path, complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a fully written model (its index and every weights file)."""
    return _complete(path, _WEIGHTED)


def _complete(path: Path, weighted: tuple[str, ...]) -> bool:
    if not (path / "model_index.json").is_file():
        return False
    return all(any((path / name).glob("*.safetensors")) for name in weighted)


def _gpt2_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def _move_into_place(built: Path, path: Path, complete: Callable[[Path], bool]) -> None:
    if path.exists():
        path.rmdir()  # empty (checked by the caller); rename cannot replace a directory
    try:
        os.rename(built, path)
    except OSError:
        if not complete(path):  # another builder won the race only if its model is complete
            raise


def _save_pipeline(out: Path, *, seed: int, flag_everything: bool = False, shapes: SdShapes = TINY_SD) -> None:
    # Heavy imports stay here: importing this module (e.g. for --help) must stay cheap.
    import torch
    from diffusers import StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        tokenizer = _tokenizer()
        pipe: Any = StableDiffusionPipeline(
            vae=_vae(shapes.vae),
            text_encoder=_text_encoder(tokenizer, shapes.text),
            tokenizer=tokenizer,
            unet=_unet(shapes.unet),
            scheduler=_scheduler(),
            safety_checker=_safety_checker(tokenizer, flag_everything=flag_everything),
            feature_extractor=_feature_extractor(),
            requires_safety_checker=True,
        )
    with _quiet_save():
        pipe.save_pretrained(out, safe_serialization=True)
    _write_legacy_tokenizer_files(out / "tokenizer")
    _normalise_model_index(out / "model_index.json")


def _save_sdxl(out: Path, *, seed: int, shapes: SdShapes) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    assert shapes.text_2 is not None, "an SDXL pipeline has a second text encoder"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tokenizer()
        pipe: Any = StableDiffusionXLPipeline(
            vae=_vae(shapes.vae),
            text_encoder=_text_encoder(tokenizer, shapes.text),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(tokenizer, shapes.text_2))).eval(),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_unet(shapes.unet),
            scheduler=_scheduler(),
        )
    with _quiet_save():
        pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        _write_legacy_tokenizer_files(out / name)


def _save_gpt2(out: Path, *, seed: int, sizes: dict[str, int]) -> None:
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        alphabet = _bytes_to_unicode()
        tokens = alphabet + ["".join(m) for m in _GPT2_MERGES] + [_GPT2_EOS]
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                           encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _GPT2_MERGES),
                                           encoding="utf-8")
        tokenizer = GPT2Tokenizer.from_pretrained(tmp, model_max_length=_GPT2_POSITIONS)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=_GPT2_POSITIONS, **sizes,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        )).eval()
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                               suppress_tokens=[eos])
    with _quiet_save():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@contextmanager
def _quiet_save() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bars (one per component) for this save only."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_legacy_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt: 518 tokens (256 bytes, the same with ``</w>``, merges, specials).

    transformers 5 saves only tokenizer.json; these let transformers 4.x slow tokenizers load the
    folder too.
    """
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in _MERGES] + list(_SPECIAL)
    vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


def _tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE CLIP tokenizer written by hand: every text tokenizes, none to <unk>."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_legacy_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=_MAX_LENGTH)


def _token_ids(tokenizer) -> dict[str, int]:  # type: ignore[no-untyped-def]
    # Passed explicitly: nested CLIP configs otherwise keep the real vocabulary's 49406/49407.
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _text_config(tokenizer, sizes: dict[str, Any] = TINY_SD.text) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {**_token_ids(tokenizer), **sizes, "max_position_embeddings": _MAX_LENGTH}


def _text_encoder(tokenizer, sizes: dict[str, Any]):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer, sizes))).eval()


def _vae(sizes: dict[str, Any]):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         **sizes).eval()


def _unet(sizes: dict[str, Any]):  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(in_channels=4, out_channels=4, **sizes).eval()


def _scheduler():  # type: ignore[no-untyped-def]
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def _safety_checker(tokenizer, *, flag_everything: bool = False):  # type: ignore[no-untyped-def]
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config=_text_config(tokenizer),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        # Above any cosine score (<= 1): the checker always says "safe"; below any: always "NSFW".
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    return checker


def _feature_extractor():  # type: ignore[no-untyped-def]
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _normalise_model_index(index: Path) -> None:
    """Record ``CLIPImageProcessor`` as real checkpoints do.

    Without torchvision, transformers substitutes ``CLIPImageProcessorPil`` and diffusers writes
    that class name into model_index.json; transformers 4.x has no such class and could not load
    the folder. Both names load the same saved preprocessor config.
    """
    data = json.loads(index.read_text(encoding="utf-8"))
    for name, entry in data.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[1] == "CLIPImageProcessorPil":
            data[name] = [entry[0], "CLIPImageProcessor"]
    index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["GPT2_MEDIUM", "SD15", "SDXL", "TINY_GPT2", "TINY_SD", "TINY_SDXL", "SdShapes", "build_tiny_gpt2",
           "build_tiny_sd", "build_tiny_sdxl", "build_tiny_single_file", "is_complete"]
