"""Plain JSON values for the JSON artifacts (model card, bench report)."""

from __future__ import annotations

import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """Plain JSON types (tuples -> lists, numpy/torch scalars -> numbers, NaN -> None, other -> str)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    return str(obj)
