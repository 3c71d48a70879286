"""Where models run and in what precision, and how much memory there is to hold them.

CUDA runs half precision: fp16 for diffusion models (their reference precision; SDXL's VAE
upcasts itself where fp16 overflows) and bf16 for language models when the GPU has it (their
activations overflow fp16 more easily). CPUs run fp32 (no fast half kernels) and so does Apple
MPS (fp16 there has produced black images).
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Literal

import torch

from consumers.errors import ModelLoadError

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
DtypeChoice = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 1024**3


def resolve_device(choice: DeviceChoice = "auto") -> torch.device:
    """``auto``: CUDA, else Apple MPS, else CPU; a forced device must be present."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(choice, False):
        raise ModelLoadError(f"device {choice!r} is not available on this machine")
    return torch.device(choice)


def dtype_for(device: torch.device, kind: Literal["image", "text"] = "image",
              choice: DtypeChoice = "auto") -> torch.dtype:
    """The precision to load a model of ``kind`` in on ``device``."""
    if choice != "auto":
        dtype = _DTYPES[choice]
        if device.type == "cpu" and dtype is torch.float16:
            raise ModelLoadError("fp16 is not supported on the CPU: use fp32 or bf16")
        return dtype
    if device.type != "cuda":
        return torch.float32
    if kind == "text" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes free for models on ``device`` now (CUDA: free VRAM; else available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    return _meminfo_available()


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def module_bytes(module: torch.nn.Module) -> int:
    """Memory held by a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def release_memory(device: torch.device) -> None:
    """Hand freed blocks back after a model is dropped, so the next one can use them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


#: How torch words a failed allocation: CUDA and MPS say "out of memory"; the CPU allocator says
#: "can't allocate memory" (or "not enough memory" in some versions).
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(words in text for words in _OUT_OF_MEMORY)


def gib(n: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.2f} MiB"
