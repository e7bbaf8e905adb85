"""Type checks for values that come from outside (request bodies, config files): numbers as
JSON, msgpack and YAML decode them. A leaf module.

`bool` is an `int` in Python and is never accepted as a number here. A JSON integer may have
thousands of digits: it is an `int`, but `math.isfinite` raises OverflowError on it, so every
range check goes through `is_finite_number` first.
"""

from __future__ import annotations

import math
from typing import TypeGuard


def is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def is_finite_number(x: object) -> TypeGuard[int | float]:
    """An int or float that a float64 holds and that is neither inf nor nan."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float64's range
        return False
