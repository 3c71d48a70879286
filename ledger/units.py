"""Kudos are shown as numbers with two decimals and stored as integer hundredths, so sums are exact."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

UNITS_PER_KUDO = 100


def to_units(kudos: float | Decimal) -> int:
    return int((Decimal(str(kudos)) * UNITS_PER_KUDO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def to_kudos(units: int) -> float:
    return units / UNITS_PER_KUDO
