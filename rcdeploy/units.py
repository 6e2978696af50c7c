"""Units a user types: fractions of the [0, 1] image range ("8/255"), shared by recipes and bench.

A floor module (no stage imports): bench parses `--eps 8/255` with the same rule as a training recipe
without importing the recipe module.
"""

from __future__ import annotations

from fractions import Fraction

from rcdeploy.errors import UsageError
from rcdeploy.validate import shown


def parse_fraction(value: float | int | str, what: str = "value") -> float:
    """'8/255' -> 0.0313..., '0.1' -> 0.1; anything else is a UsageError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UsageError(f"--{what} {shown(value)} is not a number or fraction like 8/255") from None
