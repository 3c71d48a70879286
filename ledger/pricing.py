"""What a job costs, as pure functions. The requester pays exactly what the worker earns.

Image price: 11 kudos for the reference job (512x512, 50 steps), growing with steps linearly and
with pixels sub-linearly (larger images amortise per-step overhead), times the model baseline's
factor (SDXL costs twice SD 1.x). ``11 * 4 ** 0.7 = 29.03`` for 1024x1024 at 50 steps, as on
the public AI Horde. Prices are rounded to hundredths (ledger.units) and never below 0.1.
"""

from __future__ import annotations

REFERENCE_PIXELS = 512 * 512
REFERENCE_STEPS = 50
REFERENCE_KUDOS = 11.0
PIXEL_EXPONENT = 0.7
MIN_KUDOS = 0.1

#: Cost multiplier by model baseline; unknown baselines cost as SD 1.x.
BASELINE_FACTORS: dict[str, float] = {
    "stable_diffusion_1": 1.0,
    "stable_diffusion_2": 1.0,
    "stable_diffusion_xl": 2.0,
}


def image_kudos(*, width: int, height: int, steps: int, baseline: str = "stable_diffusion_1") -> float:
    """Kudos for one image of ``width`` x ``height`` pixels at ``steps`` steps."""
    size = (width * height / REFERENCE_PIXELS) ** PIXEL_EXPONENT
    raw = REFERENCE_KUDOS * size * (steps / REFERENCE_STEPS) * BASELINE_FACTORS.get(baseline, 1.0)
    return round(max(MIN_KUDOS, raw), 2)


def megapixelsteps(*, width: int, height: int, steps: int) -> float:
    """The unit of image work the horde reports: megapixels times steps."""
    return width * height * steps / 1_000_000
