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

from rcdeploy import validate as V
from rcdeploy.errors import UsageError
from rcdeploy.io import atomic_write_bytes
from rcdeploy.quant.spec import QuantSpec

FORMAT = "rcdeploy-checkpoint"
VERSION = 1


def _tensor(v: Any, path: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise V.Invalid(path, f"expected a tensor, got {V.shown(v)}")
    return v


def _schema() -> V.Check:
    """The fields export and resume read; a file with the header but another shape fails here, by name."""
    from rcdeploy.data import META_CHECK

    return V.mapping({
        "format": V.text(),
        "version": V.integer(0),
        "model": V.mapping({"name": V.text(max_len=200), "kwargs": V.mapping(max_len=1000), "quant": V.mapping()},
                           required=("name", "kwargs", "quant")),
        "state_dict": V.mapping(values=_tensor, max_len=1_000_000),
        "optimizer": V.optional(V.mapping({"state": V.anything, "param_groups": V.list_of(V.mapping())},
                                          required=("state", "param_groups"))),
        "config": V.mapping(),
        "dataset": META_CHECK,
        "position": V.list_of(V.integer(0), min_len=2, max_len=2),
        "partial_epoch": V.optional(V.mapping({k: V.number(0) for k in ("loss", "correct", "seen", "time")})),
        "history": V.list_of(V.mapping({"epoch": V.integer(1)}, required=("epoch",)), max_len=100_000),
        "best": V.optional(V.mapping()),
        "eps": V.optional(V.number(0, 1)),
    }, required=("model", "state_dict", "config", "dataset"))


def model_spec(name: str, quant: QuantSpec, **kwargs: Any) -> dict[str, Any]:
    """What `build_model` needs to rebuild the architecture: registry name, constructor kwargs, bits."""
    return {"name": name, "kwargs": dict(kwargs), "quant": quant.to_dict()}


def build_model(spec: dict[str, Any], source: str = "model spec") -> nn.Module:
    """The architecture `spec` names; settings the model does not take are one UsageError naming them."""
    from rcdeploy.models import create_model

    kwargs = dict(spec["kwargs"])
    try:
        quant = QuantSpec.from_dict(spec["quant"])
        return create_model(spec["name"], quant=quant, **kwargs)
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        # create_model is a registry call: a foreign or edited spec fails inside a constructor
        raise UsageError(f"{source}: model {spec['name']!r} cannot be built from its settings "
                         f"(model.kwargs / model.quant: {V.clip(str(e))})") from None


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
                         f"{V.clip(str(e)) or 'unreadable'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path} is not an rcdeploy checkpoint (no '{FORMAT}' header); "
                         "export and resume read only files written by `rcdeploy train`")
    if isinstance(ckpt.get("version"), int) and ckpt["version"] > VERSION:
        raise UsageError(f"{path} was written by a newer rcdeploy (checkpoint version {ckpt['version']})")
    return V.validate(ckpt, _schema(), f"checkpoint {path}")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    ckpt = load_checkpoint(path, map_location)
    model = build_model(ckpt["model"], f"checkpoint {path}")
    load_weights(model, ckpt["state_dict"], path)
    return model.to(map_location).eval(), ckpt


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path}: state_dict does not fit the model it names "
                         f"({V.clip(str(e)) or type(e).__name__})") from None
