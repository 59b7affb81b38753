"""Exact money: Decimal at the API, integer nano-dollars in ledgers."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from ._errors import InvalidAmount

NANO = Decimal("0.000000001")
"""Ledger resolution: one nano-dollar. Costs are rounded up to it, never down."""

MAX_USD = Decimal(1_000_000_000)
"""Anything above a billion dollars is a typo, not a budget."""

MAX_COUNT = 10**15
"""Token and call counts above this are refused as absurd (and stay exact in a double)."""


def to_decimal(value: object, *, what: str = "amount") -> Decimal:
    """Turn a user amount into a Decimal, refusing anything that is not a finite, sane number.

    Floats go through ``repr`` so ``0.1`` becomes ``Decimal("0.1")``, not its binary expansion.
    """
    if isinstance(value, bool):
        raise InvalidAmount(f"{what} must be a number, got a bool ({value!r})")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAmount(f"{what} must be finite, got {value!r}")
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip().removeprefix("$"))
        except InvalidOperation:
            raise InvalidAmount(f"{what} is not a number: {value!r}") from None
    else:
        kind = type(value).__name__
        raise InvalidAmount(f"{what} must be str, int, float or Decimal, got {kind}")
    if not result.is_finite():
        raise InvalidAmount(f"{what} must be finite, got {value!r}")
    if result < 0:
        raise InvalidAmount(f"{what} must not be negative, got {value!r}")
    if result > MAX_USD:
        raise InvalidAmount(f"{what} of {value!r} is absurdly large (above {MAX_USD})")
    return result


def to_nano(usd: Decimal) -> int:
    """Dollars to integer nano-dollars, rounding up so a hold or a charge is never understated."""
    return int((usd / NANO).to_integral_value(rounding=ROUND_CEILING))


def from_nano(nano: int) -> Decimal:
    """Integer nano-dollars back to dollars, exactly."""
    return (Decimal(nano) * NANO).normalize() if nano else Decimal(0)


def to_count(value: object, *, what: str) -> int:
    """Validate a token or call count: a non-negative int below ``MAX_COUNT``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        else:
            raise InvalidAmount(f"{what} must be a whole number, got {value!r}")
    if value < 0:
        raise InvalidAmount(f"{what} must not be negative, got {value!r}")
    if value > MAX_COUNT:
        raise InvalidAmount(f"{what} of {value!r} is absurdly large (above {MAX_COUNT})")
    return value


def fmt_usd(value: Decimal | None) -> str:
    """Render dollars for people: ``$0.025``, ``$1.50``, or ``unknown``."""
    if value is None:
        return "unknown"
    if value == 0:
        return "$0"
    q = value.normalize()
    text = f"{q:f}"
    if "." in text and len(text.split(".")[1]) == 1:
        text += "0"
    return f"${text}"
