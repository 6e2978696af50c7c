"""Builds the model card (`model.json`, `rcdeploy.artifacts.ModelCard`) from a checkpoint and what export measured.

`dataset` is the checkpoint's `DatasetMeta.to_dict()` verbatim, so `DatasetMeta.from_dict` reads it back.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from rcdeploy.artifacts._json import jsonable
from rcdeploy.artifacts.checkpoint import Checkpoint
from rcdeploy.artifacts.model_card import FORMAT, VERSION, ModelCard
from rcdeploy.export.qdq import INPUT_NAME, OUTPUT_NAME

__all__ = ["FORMAT", "VERSION", "build_card", "jsonable", "training_summary", "versions"]


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


def training_summary(ckpt: Checkpoint) -> dict[str, Any]:
    """What training did to the model (attack, eps, bits, sparsity), from the checkpoint's config."""
    cfg = dict(ckpt.config)
    return jsonable({
        "adv": cfg.get("adv"),
        "eps": ckpt.training_eps,
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


def build_card(ckpt: Checkpoint, export: dict[str, Any]) -> ModelCard:
    """The model card. `export` holds what the export measured (layers, files, verification, ...)."""
    meta = dict(ckpt.dataset)
    shape = list(meta.get("shape", []))
    return ModelCard(
        model=ckpt.model,
        dataset=meta,
        input={"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32",
               "layout": "NCHW", "range": [0.0, 1.0],
               "normalization": "inside the model (mean/std below are applied by the graph)",
               "mean": meta.get("mean"), "std": meta.get("std")},
        output={"name": OUTPUT_NAME, "kind": "logits", "classes": meta.get("classes")},
        training=training_summary(ckpt),
        training_metrics={"last": ckpt.metrics or {}, "best": ckpt.best},
        **export,
        versions=versions(),
    )
