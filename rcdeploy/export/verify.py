"""Check an export before it is written: onnxruntime vs the PyTorch quantized model, and what ORT really runs.

Both checks run the bytes that will ship, through the same loader the deploy stage uses
(`rcdeploy.deploy.session.open_session`, which widens packed INT4 weights in memory).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rcdeploy.errors import VerificationError

MIN_AGREEMENT = 0.995  # top-1 agreement with PyTorch below this fails the export

# Kernels that compute a conv / matmul on integers (onnxruntime CPU names, after its QDQ fusion).
INTEGER_KERNELS = frozenset({"QLinearConv", "NhwcQLinearConv", "ConvInteger", "QGemm", "QLinearMatMul",
                             "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                           "ConvTranspose"})


def torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(device)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def compare_logits(ref: np.ndarray, got: np.ndarray, logit_step: float | None = None) -> dict[str, Any]:
    """Top-1 agreement and logit differences of two [N, K] arrays (figures for the report and sidecar)."""
    if ref.shape != got.shape:
        raise VerificationError(f"exported model returns logits of shape {list(got.shape)}, PyTorch {list(ref.shape)}")
    finite = bool(np.isfinite(got).all())
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    out: dict[str, Any] = {
        "samples": int(len(ref)),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if len(ref) else 1.0,
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0,
        "logit_range": float(np.abs(ref).max()) if ref.size else 0.0,
        "finite": finite,
    }
    if logit_step and np.isfinite(logit_step) and logit_step > 0:
        # In steps of one pooled feature through the largest weight: "how many input-grid flips away".
        out["logit_step"] = float(logit_step)
        out["max_abs_logit_diff_steps"] = out["max_abs_logit_diff"] / logit_step
    return out


def verify_onnx(model_bytes: bytes | onnx.ModelProto, torch_model: nn.Module, x: torch.Tensor,
                y: torch.Tensor | None = None, *, logit_step: float | None = None,
                min_agreement: float = MIN_AGREEMENT, threads: int | None = None) -> dict[str, Any]:
    """Run the exported model in onnxruntime on `x` ([0,1] images) and compare with `torch_model`.

    With labels `y`, both models' accuracies are reported too. Raises VerificationError when top-1
    agreement is below `min_agreement` or outputs are not finite.
    """
    from rcdeploy.deploy.session import open_session, run_logits

    proto = model_bytes if isinstance(model_bytes, onnx.ModelProto) else onnx.load_from_string(model_bytes)
    session = open_session(proto, threads=threads)
    got = run_logits(session, x.detach().cpu().numpy())
    ref = torch_logits(torch_model, x)
    report = compare_logits(ref, got, logit_step)
    report["min_agreement"] = min_agreement
    if y is not None:
        labels = y.detach().cpu().numpy()
        report["onnx_accuracy"] = float((got.argmax(1) == labels).mean()) if len(labels) else 0.0
        report["torch_accuracy"] = float((ref.argmax(1) == labels).mean()) if len(labels) else 0.0
    if not report["finite"]:
        raise VerificationError("the exported model returns non-finite logits; nothing was written")
    if report["top1_agreement"] < min_agreement:
        raise VerificationError(
            f"the exported model agrees with PyTorch on {report['top1_agreement']:.2%} of {report['samples']} "
            f"held-out images (required {min_agreement:.1%}; max logit difference "
            f"{report['max_abs_logit_diff']:.4g}); nothing was written")
    return report


def optimized_graph(model: bytes | onnx.ModelProto, *, widen: bool = True) -> onnx.ModelProto:
    """The graph onnxruntime actually runs (ORT_ENABLE_ALL, CPU), read back from `optimized_model_filepath`."""
    from rcdeploy.deploy.session import open_session

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    with tempfile.TemporaryDirectory(prefix="rcdeploy-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        open_session(proto, threads=1, optimized_model_path=path, widen=widen)
        return onnx.load(str(path))


def kernel_report(model: bytes | onnx.ModelProto, layer_macs: Mapping[str, int] | None = None, *,
                  widen: bool = True) -> dict[str, Any]:
    """Op histogram of ORT's optimized graph, float conv count and the share of MACs in integer kernels.

    `layer_macs` maps the names of the exported Conv/Gemm nodes to their MACs per image; ORT keeps
    a fused node's name as a prefix (e.g. `blocks_0_conv1_0_Conv_token_4`), which is how each
    kernel is traced back to its layer.
    """
    opt = optimized_graph(model, widen=widen)
    ops = Counter(n.op_type for n in opt.graph.node)
    report: dict[str, Any] = {
        "ops": dict(sorted(ops.items())),
        "float_conv_nodes": sum(ops[k] for k in ("Conv", "FusedConv", "NhwcFusedConv")),
        "float_matmul_nodes": sum(ops[k] for k in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul")),
        "integer_kernel_nodes": sum(ops[k] for k in INTEGER_KERNELS),
    }
    if layer_macs:
        names = sorted(layer_macs, key=len, reverse=True)  # longest prefix wins
        int_macs = float_macs = 0
        seen: set[str] = set()
        for node in opt.graph.node:
            if node.op_type not in INTEGER_KERNELS and node.op_type not in FLOAT_KERNELS:
                continue
            layer = next((n for n in names if node.name == n or node.name.startswith(n + "_")), None)
            if layer is None or layer in seen:
                continue
            seen.add(layer)
            if node.op_type in INTEGER_KERNELS:
                int_macs += layer_macs[layer]
            else:
                float_macs += layer_macs[layer]
        total = sum(layer_macs.values())
        report["macs_total"] = int(total)
        report["macs_integer"] = int(int_macs)
        report["integer_mac_share"] = float(int_macs / total) if total else 0.0
        # Layers whose kernel could not be traced back (e.g. renamed by a future ORT) count as not integer.
        report["macs_untraced"] = int(total - int_macs - float_macs)
    return report
