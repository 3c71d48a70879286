"""The sampler names the horde accepts: one list for the API (which refuses any other name at
submission) and the workers (which map every one of them onto a diffusers scheduler,
``consumers.samplers``). Plain data, importable without torch.

The names are AI Horde's (``sampler_name`` in ``/v2/generate/async``); ``DDIM`` is accepted in
both spellings because clients send either.
"""

from __future__ import annotations

DEFAULT_SAMPLER = "k_euler_a"

SAMPLER_NAMES: frozenset[str] = frozenset({
    "k_euler",
    "k_euler_a",
    "k_heun",
    "k_lms",
    "k_dpm_2",
    "k_dpm_2_a",
    "k_dpmpp_2m",
    "k_dpmpp_2s_a",
    "k_dpmpp_sde",
    "dpmsolver",
    "lcm",
    "ddim",
    "DDIM",
})
