"""AI Horde sampler names mapped to diffusers schedulers.

A scheduler holds per-run state (its timesteps), so every generation gets a fresh one built
``from_config`` of the model's own scheduler: the model's noise schedule (betas, offsets) is kept
and only the sampling method changes.

Every name in ``config.samplers.SAMPLER_NAMES`` (the list the API accepts) has an entry here and
nothing falls back silently: an unknown name is a ``GenerationError``. ``k_lms`` needs scipy and
``k_dpmpp_sde`` needs torchsde; both are in the ``worker`` extra. ``karras`` switches on Karras
sigmas for the schedulers that have them (not Euler ancestral, DDIM or LCM, which ignore it).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from config.samplers import SAMPLER_NAMES
from consumers.errors import GenerationError

#: A diffusers scheduler class (SchedulerMixin + ConfigMixin, which gives ``from_config``).
SchedulerClass = Any

#: Horde sampler name -> (diffusers scheduler class, extra config).
SAMPLERS: Mapping[str, tuple[SchedulerClass, Mapping[str, Any]]] = {
    "k_euler": (diffusers.EulerDiscreteScheduler, {}),
    "k_euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "k_heun": (diffusers.HeunDiscreteScheduler, {}),
    "k_lms": (diffusers.LMSDiscreteScheduler, {}),
    "k_dpm_2": (diffusers.KDPM2DiscreteScheduler, {}),
    "k_dpm_2_a": (diffusers.KDPM2AncestralDiscreteScheduler, {}),
    "k_dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    # diffusers has no ancestral single-step DPM++ 2S; its single-step 2nd-order solver is the
    # closest (the diffusers docs map A1111's "DPM++ 2S a" to it as well).
    "k_dpmpp_2s_a": (diffusers.DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "k_dpmpp_sde": (diffusers.DPMSolverSDEScheduler, {}),
    # plain DPM-Solver cannot end on sigma 0 (diffusers refuses it): it ends on the last sigma.
    "dpmsolver": (diffusers.DPMSolverMultistepScheduler,
                  {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "lcm": (diffusers.LCMScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "DDIM": (diffusers.DDIMScheduler, {}),
}

assert set(SAMPLERS) == SAMPLER_NAMES, "consumers.samplers and config.samplers disagree"


def scheduler_for(sampler_name: str, *, karras: bool, base_config: Mapping[str, Any],
                  seed: int | None = None) -> SchedulerMixin:
    """A fresh scheduler for ``sampler_name`` on the model's noise schedule.

    ``seed`` seeds the Brownian noise of the SDE sampler, which does not use the pipeline's
    generator: without it the same seed would give a different image every time.
    """
    if sampler_name not in SAMPLERS:
        raise GenerationError(f"unknown sampler {sampler_name!r}; known: {', '.join(sorted(SAMPLERS))}")
    cls, extra = SAMPLERS[sampler_name]
    overrides = dict(extra)
    if karras and _accepts(cls, "use_karras_sigmas"):
        overrides["use_karras_sigmas"] = True
    if seed is not None and _accepts(cls, "noise_sampler_seed"):
        overrides["noise_sampler_seed"] = seed
    scheduler: SchedulerMixin = cls.from_config(base_config, **overrides)
    return scheduler


def _accepts(cls: SchedulerClass, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters
