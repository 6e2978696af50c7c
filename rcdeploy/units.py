"""Units a user types: fractions of the [0, 1] image range ("8/255") and sizes ("20KB"), shared by recipes and bench.

A floor module (no stage imports): bench parses `--eps 8/255` with the same rule as a training recipe
without importing the recipe module.
"""

from __future__ import annotations

import re
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


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def parse_size(value: int | str, what: str = "size") -> int:
    """'20KB' -> 20000, '20KiB' -> 20480, '1.5MB', '300' (bytes) -> int bytes; KB = 1000 B, KiB = 1024 B."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise UsageError(f"--{what} {shown(value)} is not a size; write bytes or a number with KB, KiB, MB, "
                             "MiB (e.g. 20KB)")
        n = float(m.group(1)) * _SIZE_UNITS[unit]
    if not 0 < n < 2**63:
        raise UsageError(f"--{what} {shown(value)} must be a positive size")
    return int(n)


def format_size(n: int) -> str:
    """Bytes for people: '950 B', '20.0 KB' (KB = 1000 B, as `parse_size` reads it)."""
    return f"{n} B" if n < 10_000 else f"{n / 1000:.1f} KB"
