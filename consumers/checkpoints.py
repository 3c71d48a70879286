"""Writing a Stable Diffusion 1.x or SDXL pipeline as one original-layout ``.safetensors`` checkpoint.

Community models ship as single files in the original (CompVis/LDM) key layout
(``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``…), which diffusers reads with
``from_single_file``. This module is the inverse of diffusers' own converters
(``diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint``), written for
any block layout, so the tests can turn the tiny diffusers pipeline into such a file and load it
back through the worker's single-file path: the images must then be byte-identical.

Only the weighted parts of a checkpoint are written (UNet, VAE, text encoders: CLIP for SD 1.x;
CLIP plus OpenCLIP for SDXL, as ``conditioner.embedders.0/1``); like the real files, it carries no
safety checker, tokenizer or scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
)


def save_original_checkpoint(pipe: Any, path: Path) -> Path:
    """Write ``pipe``'s UNet, VAE and text encoder as one original-layout safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    tensors.update(_prefixed(UNET_PREFIX, unet_to_original(pipe.unet.state_dict(), pipe.unet.config)))
    tensors.update(_prefixed(VAE_PREFIX, vae_to_original(pipe.vae.state_dict(), pipe.vae.config)))
    if getattr(pipe, "text_encoder_2", None) is None:
        tensors.update(_prefixed(CLIP_PREFIX, clip_to_original(pipe.text_encoder.state_dict())))
    else:
        tensors.update(_prefixed(SDXL_CLIP_PREFIX, clip_to_original(pipe.text_encoder.state_dict())))
        tensors.update(_prefixed(SDXL_OPEN_CLIP_PREFIX, open_clip_to_original(pipe.text_encoder_2.state_dict())))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _prefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in tensors.items()}


def _resnet(rest: str) -> str:
    for new, old in _UNET_RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_original(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """diffusers UNet2DConditionModel keys -> LDM ``openaimodel`` keys (any blocks and layers)."""
    per_block = config["layers_per_block"] + 1
    out: dict[str, Any] = {}
    for key, value in state.items():
        out[_unet_key(key, per_block, state)] = value
    return out


def _unet_key(key: str, per_block: int, state: dict[str, Any]) -> str:
    for new, old in _UNET_LAYERS.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if key.startswith("add_embedding.linear_"):
        return key.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2", "label_emb.0.2")
    parts = key.split(".")
    if parts[0] == "down_blocks":
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + block * per_block + layer}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + block * per_block + layer}.1.{rest}"
        # downsamplers.0.conv.*: the block's last input block
        return f"input_blocks.{1 + block * per_block + per_block - 1}.0.op.{'.'.join(parts[5:])}"
    if parts[0] == "mid_block":
        kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{index}.1.{rest}"
        # upsamplers.0.conv.*: after the attention of the block's last layer, if it has one
        last = block * per_block + per_block - 1
        has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in state)
        return f"output_blocks.{last}.{2 if has_attention else 1}.conv.{'.'.join(parts[5:])}"
    raise ValueError(f"no original-layout name for UNet key {key!r}")


def vae_to_original(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """diffusers AutoencoderKL keys -> LDM ``first_stage_model`` keys (attention as 1x1 convs)."""
    blocks = len(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, value in state.items():
        new_key = _vae_key(key, blocks)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM stores q, k, v and proj_out as 1x1 convolutions
        out[new_key] = value
    return out


def _vae_key(key: str, blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out")
    parts = key.split(".")
    coder = parts[0]
    if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
        index = int(parts[2])
        stage = "down" if parts[1] == "down_blocks" else "up"
        original = index if stage == "down" else blocks - 1 - index
        if parts[3] == "resnets":
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.{stage}.{original}.block.{parts[4]}.{rest}"
        sampler = "downsample" if stage == "down" else "upsample"
        return f"{coder}.{stage}.{original}.{sampler}.{'.'.join(parts[5:])}"
    if len(parts) > 2 and parts[1] == "mid_block":
        if parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.mid.block_{int(parts[3]) + 1}.{rest}"
        rest = ".".join(parts[4:])
        for new, old in _VAE_ATTENTION:
            if rest.startswith(new + "."):
                rest = old + rest[len(new):]
                break
        return f"{coder}.mid.attn_1.{rest}"
    return key


def clip_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModel keys as SD 1.x checkpoints hold them (``text_model.…``)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


_OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


def open_clip_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModelWithProjection keys -> OpenCLIP's (SDXL's second text encoder): one
    ``in_proj`` for q, k and v, and the projection as a matrix applied on the right."""
    import torch

    state = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
             for k, v in state.items()}
    out: dict[str, Any] = {
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for n in layers:
        old = f"text_model.encoder.layers.{n}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{old}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")])
        for key, value in state.items():
            if not key.startswith(old) or ".self_attn." in key and "out_proj" not in key:
                continue
            rest = key[len(old):]
            for new, original in _OPEN_CLIP_LAYER:
                if rest.startswith(new + "."):
                    out[f"transformer.resblocks.{n}.{original}{rest[len(new):]}"] = value
    return out
