"""rcdeploy: robust, compressed, integer image classifiers, verified on the runtime that ships them.

The Python API (`rcdeploy.api`): `rcdeploy.train(...)`, `rcdeploy.export(...)`, `rcdeploy.bench(...)`,
imported on first use so that `import rcdeploy` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["bench", "export", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "export"):  # the stage packages, callable as the API functions
        return importlib.import_module(f"rcdeploy.{name}")
    if name == "bench":
        from rcdeploy.api import bench

        return bench
    raise AttributeError(f"module 'rcdeploy' has no attribute {name!r}")
