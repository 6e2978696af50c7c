"""The contract between stages as types: one class per file handed from a stage to the next.

- `Checkpoint` (`rcdeploy-checkpoint` v1, `best.pt` / `last.pt`): train -> export (and resume);
- `ModelCard` (`rcdeploy-model-card` v1, `model.json` beside `model.onnx`): export -> bench;
- `BenchReport` (`rcdeploy-bench` v1, `bench --json`): bench -> compare, CSV, scripts.

Each has a format name and version, one `save` and one `load` (validated: a foreign or newer file is
one UsageError line). `Checkpoint` needs torch, so it is imported on first use: the JSON artifacts
stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rcdeploy.artifacts.bench_report import BenchReport
from rcdeploy.artifacts.model_card import ModelCard

if TYPE_CHECKING:
    from rcdeploy.artifacts.checkpoint import Checkpoint

__all__ = ["BenchReport", "Checkpoint", "ModelCard"]


def __getattr__(name: str) -> Any:
    if name == "Checkpoint":
        from rcdeploy.artifacts.checkpoint import Checkpoint

        return Checkpoint
    raise AttributeError(f"module 'rcdeploy.artifacts' has no attribute {name!r}")
