"""Text prices: AI Horde's formula (ledger.pricing), quoted on max_length, settled on the text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.pricing import MIN_KUDOS, billed_tokens, text_context_multiplier, text_kudos


@pytest.mark.parametrize(("context", "multiplier"), [(1024, 2.2), (2048, 3.4), (4096, 6.04), (512, 1.2 + 2.2 ** -1)])
def test_the_context_multiplier(context: int, multiplier: float) -> None:
    assert text_context_multiplier(context) == pytest.approx(multiplier)


def test_the_context_multiplier_is_clamped() -> None:
    assert text_context_multiplier(1024 * 2**10) == 30.0


@pytest.mark.parametrize(("tokens", "billions", "context", "kudos"), [
    (80, 13.0, 1024, 18.30),  # 80 x 1 x 13/125 x 2.2
    (80, 70.0, 4096, 378.92),
    (80, 7.0, 1024, 9.86),  # below 13B the size factor is B/125 alone
    (80, 0.0001, 1024, MIN_KUDOS),
])
def test_goldens(tokens: int, billions: float, context: int, kudos: float) -> None:
    assert text_kudos(tokens=tokens, parameters_b=billions, max_context_length=context) == kudos


@pytest.mark.parametrize(("characters", "max_length", "tokens"), [
    (0, 80, 20), (40, 80, 20), (100, 80, 25), (1000, 80, 80), (3, 5, 5),
])
def test_billed_tokens(characters: int, max_length: int, tokens: int) -> None:
    assert billed_tokens(text="x" * characters, max_length=max_length) == tokens


@given(text=st.text(max_size=3000), max_length=st.integers(1, 512), context=st.integers(80, 65536),
       billions=st.floats(0, 200))
def test_a_settled_text_never_costs_more_than_its_quote(text: str, max_length: int, context: int,
                                                        billions: float) -> None:
    quote = text_kudos(tokens=max_length, parameters_b=billions, max_context_length=context)
    settled = text_kudos(tokens=billed_tokens(text=text, max_length=max_length), parameters_b=billions,
                         max_context_length=context)
    assert MIN_KUDOS <= settled <= quote
