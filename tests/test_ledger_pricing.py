"""The kudos math is pure: properties that must hold for every input, and a few anchors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.pricing import (
    BASELINE_FACTORS, MIN_KUDOS, REFERENCE_KUDOS, horde_tax, image_kudos, request_kudos,
)
from ledger.tiers import HIGHEST_TIER, LOWEST_TIER, priority_tier

sizes = st.integers(min_value=1, max_value=48).map(lambda k: k * 64)
steps = st.integers(min_value=1, max_value=500)
baselines = st.sampled_from(sorted(BASELINE_FACTORS) + ["something_new"])
features = st.fixed_dictionaries({"img2img": st.booleans(), "inpainting": st.booleans(),
                                  "post_processors": st.integers(min_value=0, max_value=3)})


def test_anchors() -> None:
    assert image_kudos(width=512, height=512, steps=50) == REFERENCE_KUDOS
    assert image_kudos(width=1024, height=1024, steps=50) == 29.03  # as the public AI Horde
    assert image_kudos(width=1024, height=1024, steps=50, baseline="stable_diffusion_xl") == 58.06
    assert image_kudos(width=64, height=64, steps=1) == MIN_KUDOS
    assert horde_tax(11.0) == 0.55 and horde_tax(0.1) == 0.01 and horde_tax(0) == 0


@given(w=sizes, h=sizes, s=steps, b=baselines, f=features)
def test_never_below_the_minimum(w: int, h: int, s: int, b: str, f: dict) -> None:
    assert image_kudos(width=w, height=h, steps=s, baseline=b, **f) >= MIN_KUDOS


@given(w=sizes, h=sizes, s=steps, b=baselines, f=features)
def test_monotone_in_every_driver(w: int, h: int, s: int, b: str, f: dict) -> None:
    price = image_kudos(width=w, height=h, steps=s, baseline=b, **f)
    assert image_kudos(width=w + 64, height=h, steps=s, baseline=b, **f) >= price
    assert image_kudos(width=w, height=h + 64, steps=s, baseline=b, **f) >= price
    assert image_kudos(width=w, height=h, steps=s + 1, baseline=b, **f) >= price
    assert image_kudos(width=w, height=h, steps=s, baseline=b, **{**f, "img2img": True}) >= price
    assert image_kudos(width=w, height=h, steps=s, baseline=b, **{**f, "inpainting": True}) >= price
    more_pp = {**f, "post_processors": f["post_processors"] + 1}
    assert image_kudos(width=w, height=h, steps=s, baseline=b, **more_pp) >= price
    assert image_kudos(width=w, height=h, steps=s, baseline="stable_diffusion_xl", **f) >= \
        image_kudos(width=w, height=h, steps=s, baseline="stable_diffusion_1", **f)


@given(w=sizes, h=sizes, s=steps, b=baselines, f=features)
def test_equal_for_equivalent_inputs(w: int, h: int, s: int, b: str, f: dict) -> None:
    # Only the pixel count matters, not the orientation; unknown baselines cost as SD 1.x.
    assert image_kudos(width=w, height=h, steps=s, baseline=b, **f) == \
        image_kudos(width=h, height=w, steps=s, baseline=b, **f)
    if b not in BASELINE_FACTORS:
        assert image_kudos(width=w, height=h, steps=s, baseline=b, **f) == \
            image_kudos(width=w, height=h, steps=s, **f)


@given(each=st.floats(min_value=0.1, max_value=10_000), n=st.integers(min_value=1, max_value=20))
def test_a_request_grows_with_n(each: float, n: int) -> None:
    assert request_kudos(each, n + 1) >= request_kudos(each, n) >= 0


@given(kudos=st.floats(min_value=0, max_value=1e6))
def test_tax_is_small_non_negative_and_monotone(kudos: float) -> None:
    tax = horde_tax(kudos)
    assert tax >= 0
    assert tax <= max(0.01, kudos * 0.05 + 0.005)
    assert horde_tax(kudos + 1) >= tax


@given(balance=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_tiers_are_monotone_and_bounded(balance: float) -> None:
    tier = priority_tier(balance)
    assert LOWEST_TIER <= tier <= HIGHEST_TIER
    assert priority_tier(balance + 1000) >= tier
    assert priority_tier(balance, anonymous=True) == LOWEST_TIER


@pytest.mark.parametrize("balance, tier", [(-5, 0), (0, 0), (0.01, 1), (999, 1), (1000, 2), (10_000, 3),
                                           (100_000, 4), (1e12, 4)])
def test_tier_boundaries(balance: float, tier: int) -> None:
    assert priority_tier(balance) == tier
