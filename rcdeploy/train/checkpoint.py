"""Checkpoints: one self-describing file per stage hand-off (model spec + weights + config + metrics).

Written atomically (temp file + rename) and read with torch.load(weights_only=True): a checkpoint
is data, never code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.io import atomic_write_bytes
from rcdeploy.quant.spec import QuantSpec

FORMAT = "rcdeploy-checkpoint"
VERSION = 1


def model_spec(name: str, quant: QuantSpec, **kwargs: Any) -> dict[str, Any]:
    """What `build_model` needs to rebuild the architecture: registry name, constructor kwargs, bits."""
    return {"name": name, "kwargs": dict(kwargs), "quant": quant.to_dict()}


def build_model(spec: dict[str, Any]) -> nn.Module:
    from rcdeploy.models import create_model

    kwargs = dict(spec["kwargs"])
    return create_model(spec["name"], quant=QuantSpec.from_dict(spec["quant"]), **kwargs)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save into memory, then an atomic write (temp file + rename) over `path`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; anything else (missing, corrupt, foreign) is a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path} (train one with `rcdeploy train`, or pass its path)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign pickles
        raise UsageError(f"{path} is not a readable rcdeploy checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path} is not an rcdeploy checkpoint (no '{FORMAT}' header); "
                         "export and resume read only files written by `rcdeploy train`")
    if ckpt.get("version", 0) > VERSION:
        raise UsageError(f"{path} was written by a newer rcdeploy (checkpoint version {ckpt['version']})")
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    ckpt = load_checkpoint(path, map_location)
    model = build_model(ckpt["model"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UsageError(f"{path}: weights do not fit the model it names ({str(e).splitlines()[0][:160]})") from None
    return model.to(map_location).eval(), ckpt
