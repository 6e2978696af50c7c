"""Checkpoints as training writes and resumes them; the format itself is `rcdeploy.artifacts.checkpoint`.

`load_checkpoint` returns the validated file as a dict (the raw view resume and tests look into);
other stages read `Checkpoint` objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rcdeploy.artifacts.checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    atomic_save,
    build_model,
    load_weights,
    model_spec,
    read_checkpoint,
)

__all__ = ["FORMAT", "VERSION", "Checkpoint", "atomic_save", "build_model", "load_checkpoint", "load_model",
           "load_weights", "model_spec"]


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; anything else (missing, corrupt, foreign) is a UsageError."""
    return read_checkpoint(path, map_location)


def load_model(path: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode), with the file's dict."""
    raw = read_checkpoint(path, map_location)
    return Checkpoint.from_dict(raw, path).build_model(map_location), raw
