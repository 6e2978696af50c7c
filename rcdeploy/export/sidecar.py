"""Builds the model card (`model.json`, `rcdeploy.artifacts.ModelCard`) from a checkpoint and what export measured.

`dataset` is the checkpoint's `DatasetMeta.to_dict()` verbatim, so `DatasetMeta.from_dict` reads it back.
"""

from __future__ import annotations

import io
import math
import zipfile
from importlib import metadata
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from rcdeploy.artifacts._json import jsonable
from rcdeploy.artifacts.checkpoint import Checkpoint
from rcdeploy.artifacts.model_card import FORMAT, VERSION, ModelCard
from rcdeploy.export.qdq import INPUT_NAME, OUTPUT_NAME

__all__ = ["FORMAT", "VERSION", "build_card", "compression_figures", "jsonable", "training_summary",
           "weight_integers", "versions", "zip_bytes"]
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")
SCALE_BITS = 32  # a float32 scale per output channel


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
        "sparsity": cfg.get("sparsity") if cfg.get("prune_channels") or cfg.get("prune_weights") else None,
        "prune_weights": cfg.get("prune_weights"),
        "codebook_bits": cfg.get("codebook_bits"),
        "seed": cfg.get("seed"),
        "bit_allocation": ckpt.bit_allocation,  # --bits auto: bits, norms, amplification, errors per layer
        "config": cfg,
    })


def build_card(ckpt: Checkpoint, export: dict[str, Any], integer: onnx.ModelProto | None = None) -> ModelCard:
    """The model card. `export` holds what the export measured (layers, files, verification, ...); with the
    `integer` (QDQ) graph, `compression` holds its weight-compression figures (`compression_figures`)."""
    meta = dict(ckpt.dataset)
    shape = list(meta.get("shape", []))
    export = dict(export)
    # Sections the card type does not name travel in `extra`: `noise` (stochastic graph, coefficient).
    # `low_rank`: CSTAR's factorized layers (ranks, params and MACs against the dense originals).
    extra = {k: export.pop(k) for k in ("noise", "low_rank") if export.get(k) is not None}
    export.pop("noise", None)
    export.pop("low_rank", None)
    if integer is not None:
        extra["compression"] = compression_figures(integer, integer.SerializeToString())
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
        extra=extra,
    )


def zip_bytes(data: bytes, name: str = "model.onnx") -> int:
    """Size of a zip archive (deflate at zip's default level, 6) holding `data` as one file: what generic
    compression buys."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        z.writestr(name, data)
    return len(buf.getvalue())


def weight_integers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Node name -> the integer weights a Conv/Gemm (or ConvInteger) of the QDQ graph computes with, read from
    the file: the DequantizeLinear's data (through the Cast/Mul of packed INT4 storage) minus its zero point."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name]).astype(np.int64)
        node = made_by.get(name)
        if node is None or node.op_type not in ("Cast", "Mul"):
            return None
        parts = [const(i) for i in node.input]
        if any(p is None for p in parts):
            return None
        return parts[0] if node.op_type == "Cast" else parts[0] * parts[1]

    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        dq = made_by.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            data, zp = dq.input[0], dq.input[2] if len(dq.input) > 2 else ""
        elif node.op_type.endswith("Integer"):
            data, zp = node.input[1], node.input[3] if len(node.input) > 3 else ""
        else:
            continue
        w = const(data)
        if w is None:
            continue
        z = const(zp) if zp else None
        if z is not None and z.size > 1:  # per output channel, axis 0
            z = z.reshape((-1,) + (1,) * (w.ndim - 1))
        out[node.name or node.output[0]] = w - (0 if z is None else z)
    return out


def compression_figures(model: onnx.ModelProto, data: bytes | None = None) -> dict[str, Any]:
    """What unstructured sparsity and codebooks (ATMC) buy, from the integer file itself.

    Per weight tensor (N entries, nnz nonzero integers, d distinct nonzero integers, O output channels):
    b = ceil(log2 d) bits per nonzero (a codebook index); index bits = min(N, nnz * ceil(log2 N)) (a bitmap
    or absolute positions, whichever is smaller); codebook bits = d * 8 (the integer centers) + O * 32 (the
    channel scales that make them real). Theoretical bits = nnz * b + index + codebook. `atmc_ratio` is
    ATMC's own definition, sum(nnz * b) / (N_total * 32): it ignores index and codebook. The file is dense
    int8 (QLinearConv gains no speed from zeros): `file_bytes` and `zip_bytes` say what it weighs on disk,
    `rcdeploy bench` how fast it runs.
    """
    rows = []
    for name, w in weight_integers(model).items():
        n, nz = int(w.size), w[w != 0]
        nnz, distinct = int(nz.size), int(np.unique(nz).size)
        b = math.ceil(math.log2(distinct)) if distinct > 1 else 0
        index = min(n, nnz * math.ceil(math.log2(max(n, 2))))
        codebook = distinct * 8 + int(w.shape[0]) * SCALE_BITS
        rows.append({"name": name, "params": n, "nnz": nnz, "density": nnz / max(1, n),
                     "distinct_nonzero": distinct, "bits_per_nonzero": b, "value_bits": nnz * b,
                     "index_bits": index, "codebook_bits": codebook, "theoretical_bits": nnz * b + index + codebook})
    total = {k: sum(r[k] for r in rows) for k in ("params", "nnz", "value_bits", "index_bits", "codebook_bits",
                                                    "theoretical_bits")}
    out: dict[str, Any] = {
        "definition": "per weight tensor: nnz * ceil(log2 distinct nonzero) + min(N, nnz * ceil(log2 N)) index "
                      "+ distinct * 8 + out_channels * 32 codebook bits; atmc_ratio = sum(nnz * b) / (N * 32)",
        **total, "density": total["nnz"] / max(1, total["params"]),
        "max_distinct_nonzero": max((r["distinct_nonzero"] for r in rows), default=0),
        "theoretical_bytes": math.ceil(total["theoretical_bits"] / 8),
        "atmc_ratio": total["value_bits"] / max(1, total["params"] * 32),
        "layers": rows,
    }
    if data is not None:
        out.update({"file_bytes": len(data), "zip_bytes": zip_bytes(data)})
    return out
