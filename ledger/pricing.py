"""What a job costs, as pure functions. The requester pays what the worker earns, plus the horde tax.

See docs/kudos.md for the formulas, their reasons and worked examples.

Image: 11 kudos for the reference job (512x512, 50 steps, SD 1.x), linear in steps, sub-linear in
pixels (``(pixels / 512²) ** 0.7``: larger images amortise per-step overhead; 1024x1024 costs
``11 * 4 ** 0.7 = 29.03`` as on the public AI Horde), times the model baseline's factor, times a
factor per feature (img2img, inpainting, each post-processor). Never below 0.1 per image.

Tax: the horde burns ``TAX_RATE`` of each job's price on top of it (at least 0.01), so that kudos
minted by uptime rewards and grants do not inflate forever. Workers earn the price, untaxed.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

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

IMG2IMG_FACTOR = 1.3  # encoding the source image, and the extra memory it takes
INPAINTING_FACTOR = 1.4  # the source image, a mask, and an inpainting model
POST_PROCESSOR_FACTOR = 1.1  # each upscaler or face fixer run after generation

TAX_RATE = 0.05
MIN_TAX = 0.01


def image_kudos(*, width: int, height: int, steps: int, baseline: str = "stable_diffusion_1",
                img2img: bool = False, inpainting: bool = False, post_processors: int = 0) -> float:
    """Kudos a worker earns for one image of ``width`` x ``height`` pixels at ``steps`` steps."""
    size = (width * height / REFERENCE_PIXELS) ** PIXEL_EXPONENT
    raw = REFERENCE_KUDOS * size * (steps / REFERENCE_STEPS) * BASELINE_FACTORS.get(baseline, 1.0)
    if inpainting:
        raw *= INPAINTING_FACTOR
    elif img2img:
        raw *= IMG2IMG_FACTOR
    raw *= POST_PROCESSOR_FACTOR ** max(0, post_processors)
    return _hundredths(max(MIN_KUDOS, raw))


def request_kudos(each: float, n: int) -> float:
    """A request of ``n`` images costs ``n`` times one: each image is its own job."""
    return _hundredths(each * n)


def horde_tax(kudos: float) -> float:
    """What the horde burns on top of a job's price; nothing for a free job."""
    if kudos <= 0:
        return 0.0
    return max(MIN_TAX, _hundredths(kudos * TAX_RATE))


def megapixelsteps(*, width: int, height: int, steps: int) -> float:
    """The unit of image work the horde reports: megapixels times steps."""
    return width * height * steps / 1_000_000


def _hundredths(value: float) -> float:
    # Decimal rounding: float round() would turn 0.125 into 0.12 and 0.135 into 0.14.
    return float(Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
