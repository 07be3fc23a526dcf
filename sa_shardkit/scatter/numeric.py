"""``avg()`` recomputed from per-shard sums and counts, rounded exactly as PostgreSQL rounds it.

PostgreSQL's ``avg`` of integers and ``numeric`` is ``numeric`` division, whose result scale is chosen
by ``select_div_scale`` (at least 16 significant digits, never fewer decimals than the inputs) and
rounded half away from zero. Copying that rule makes a merged ``avg`` equal, digit for digit, to the
value one database holding every row would return.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from fractions import Fraction
from typing import Any

_MIN_SIG_DIGITS = 16
_MAX_DISPLAY_SCALE = 1000
_DEC_DIGITS = 4  # PostgreSQL stores numerics in base-10000 digits


def _weight_and_first_digit(value: Decimal) -> tuple[int, int]:
    if value == 0:
        return 0, 0
    value = abs(value)
    weight = value.adjusted() // _DEC_DIGITS
    return weight, int(Fraction(value) / Fraction(10000) ** weight)


def _display_scale(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def numeric_div(dividend: Decimal | int, divisor: Decimal | int) -> Decimal:
    """``dividend / divisor`` with PostgreSQL's ``numeric_div`` scale and rounding."""
    a, b = Decimal(dividend), Decimal(divisor)
    weight1, first1 = _weight_and_first_digit(a)
    weight2, first2 = _weight_and_first_digit(b)
    qweight = weight1 - weight2 - (1 if first1 <= first2 else 0)
    scale = max(_MIN_SIG_DIGITS - qweight * _DEC_DIGITS, _display_scale(a), _display_scale(b), 0)
    scale = min(scale, _MAX_DISPLAY_SCALE)
    scaled = Fraction(a) / Fraction(b) * 10**scale
    magnitude = (2 * abs(scaled.numerator) + scaled.denominator) // (2 * scaled.denominator)
    digits = tuple(int(d) for d in str(magnitude))
    return Decimal((1 if scaled < 0 else 0, digits, -scale))


def average(total: Any, count: Any) -> Any:
    """The global ``avg`` from a combined sum and count (``None`` over no values, as in SQL)."""
    if total is None or not count:
        return None
    if isinstance(total, (int, Decimal)) and not isinstance(total, bool):
        return numeric_div(total, count)
    if isinstance(total, dt.timedelta):
        return total / count
    return total / count
