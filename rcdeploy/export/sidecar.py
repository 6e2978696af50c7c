"""The sidecar `model.json`: everything `bench` (or an app) needs to know about an exported model.

`dataset` is the checkpoint's `DatasetMeta.to_dict()` verbatim, so `DatasetMeta.from_dict` reads it back.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

from rcdeploy.export.qdq import INPUT_NAME, OUTPUT_NAME

FORMAT = "rcdeploy-model-card"
VERSION = 1


def versions() -> dict[str, str | None]:
    """Installed versions of the packages an export depends on."""
    out: dict[str, str | None] = {}
    for pkg in ("rcdeploy", "torch", "brevitas", "onnx", "onnxruntime", "qonnx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if out["rcdeploy"] is None:  # running from a checkout that is not pip-installed
        import rcdeploy

        out["rcdeploy"] = rcdeploy.__version__
    return out


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


def training_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What training did to the model (attack, eps, bits, sparsity), from the checkpoint's config."""
    cfg = dict(ckpt.get("config") or {})
    eps = ckpt.get("eps", cfg.get("eps"))
    return jsonable({
        "adv": cfg.get("adv"),
        "eps": eps,
        "attack_steps": cfg.get("steps"),
        "step_size": cfg.get("step_size"),
        "weight_bits": cfg.get("bits"),
        "act_bits": cfg.get("act_bits"),
        "first_last_bits": cfg.get("first_last_bits"),
        "epochs": cfg.get("epochs"),
        "prune_channels": cfg.get("prune_channels"),
        "sparsity": cfg.get("sparsity") if cfg.get("prune_channels") else None,
        "seed": cfg.get("seed"),
        "config": cfg,
    })


def build_card(*, ckpt: dict[str, Any], model_spec: dict[str, Any], export: dict[str, Any]) -> dict[str, Any]:
    """The sidecar dict. `export` holds what the export measured (layers, files, verification, ...)."""
    meta = dict(ckpt.get("dataset") or {})
    shape = list(meta.get("shape", []))
    card = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec,
        "dataset": meta,
        "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32",
                  "layout": "NCHW", "range": [0.0, 1.0],
                  "normalization": "inside the model (mean/std below are applied by the graph)",
                  "mean": meta.get("mean"), "std": meta.get("std")},
        "output": {"name": OUTPUT_NAME, "kind": "logits",
                   "classes": meta.get("classes")},
        "training": training_summary(ckpt),
        "training_metrics": {"last": ckpt.get("metrics") or {}, "best": ckpt.get("best")},
        **export,
        "versions": versions(),
    }
    return jsonable(card)


def card_text(card: dict[str, Any]) -> str:
    return json.dumps(card, indent=2, sort_keys=False) + "\n"


def read_card(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
