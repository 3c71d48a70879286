"""AI Horde sampler names mapped to diffusers schedulers.

A scheduler holds per-run state (its timesteps), so every generation gets a fresh one built
``from_config`` of the model's own scheduler: the model's noise schedule (betas, offsets) is kept
and only the sampling method changes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

#: A diffusers scheduler class (SchedulerMixin + ConfigMixin, which gives ``from_config``).
SchedulerClass = Any

log = logging.getLogger(__name__)

DEFAULT_SAMPLER = "k_euler"

#: Horde sampler name -> (diffusers scheduler class, extra config). k_lms and the SDE samplers are
#: absent: they need scipy / torchsde, which a worker does not install; they fall back to Euler.
SAMPLERS: Mapping[str, tuple[SchedulerClass, Mapping[str, Any]]] = {
    "k_euler": (diffusers.EulerDiscreteScheduler, {}),
    "k_euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "k_heun": (diffusers.HeunDiscreteScheduler, {}),
    "k_dpm_2": (diffusers.KDPM2DiscreteScheduler, {}),
    "k_dpm_2_a": (diffusers.KDPM2AncestralDiscreteScheduler, {}),
    "k_dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsolver": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (diffusers.DDIMScheduler, {}),
}


def scheduler_for(sampler_name: str, *, karras: bool, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for ``sampler_name`` on the model's noise schedule; unknown names -> Euler."""
    if sampler_name not in SAMPLERS:
        log.warning("unknown sampler %r, using %s", sampler_name, DEFAULT_SAMPLER)
    cls, extra = SAMPLERS.get(sampler_name, SAMPLERS[DEFAULT_SAMPLER])
    overrides = dict(extra)
    if karras and _accepts(cls, "use_karras_sigmas"):
        overrides["use_karras_sigmas"] = True
    scheduler: SchedulerMixin = cls.from_config(base_config, **overrides)
    return scheduler


def _accepts(cls: SchedulerClass, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters
