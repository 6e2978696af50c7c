"""Check an export before it is written: onnxruntime vs the PyTorch quantized model, and what ORT really runs.

Both checks run the bytes that will ship, through the same loader the deploy stage uses
(`rcdeploy.runtime.session.open_session`, which widens packed INT4 weights in memory).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rcdeploy.errors import VerificationError
from rcdeploy.runtime.graph import FLOAT_KERNELS, INTEGER_KERNELS

MIN_AGREEMENT = 0.995  # share of held-out images that must agree (see `judge`)
# Allowed |logit difference| per image, in logit steps (one input step of the last layer through its
# largest weight). onnxruntime's requantization rounds a few activations one step away from PyTorch's
# and the flips add up through depth: faithful exports measured here (digits, exact kernels) reach
# a median of 2-10 and a maximum of 68 steps (ResNet-20); the same models with saturating kernels
# (AVX2, emulated) miss by a median of 190-1,360 steps. 128 sits between, with room for deeper nets.
TOLERANCE_STEPS = 128.0
# ... and never more than this share of the logits' range (an untrained model's logits span less than
# 128 steps: the bound must still bite there).
TOLERANCE_RANGE = 0.1

def torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(device)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def compare_logits(ref: np.ndarray, got: np.ndarray, logit_step: float | None = None,
                   tolerance_steps: float = TOLERANCE_STEPS) -> dict[str, Any]:
    """Agreement figures of two [N, K] logit arrays (PyTorch `ref`, exported `got`).

    With a logit step (one input step of the last layer through its largest weight: the unit of the
    integer graph's rounding), each image's error max_k |ref - got| is counted in steps against a
    tolerance of `tolerance_steps` (at most TOLERANCE_RANGE of the logits' range), and top-1
    agreement is also given on the *decisive* images: those whose PyTorch margin (top-1 minus
    top-2 logit) exceeds twice the allowed error, where no faithful export can flip the decision.
    """
    if ref.shape != got.shape:
        raise VerificationError(f"exported model returns logits of shape {list(got.shape)}, PyTorch {list(ref.shape)}")
    finite = bool(np.isfinite(got).all())
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    agree = ref.argmax(1) == got.argmax(1)
    out: dict[str, Any] = {
        "samples": int(len(ref)),
        "top1_agreement": float(agree.mean()) if len(ref) else 1.0,
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0,
        "logit_range": float(np.abs(ref).max()) if ref.size else 0.0,
        "finite": finite,
    }
    if logit_step and np.isfinite(logit_step) and logit_step > 0 and len(ref) and ref.shape[1] > 1:
        err_steps = (diff.max(1) if diff.size else np.zeros(len(ref))) / logit_step
        tolerance_steps = min(tolerance_steps, TOLERANCE_RANGE * out["logit_range"] / logit_step)
        top2 = np.sort(ref.astype(np.float64), axis=1)[:, -2:]
        margin_steps = (top2[:, 1] - top2[:, 0]) / logit_step
        decisive = margin_steps > 2 * tolerance_steps
        out.update({
            "logit_step": float(logit_step),
            "max_abs_logit_diff_steps": out["max_abs_logit_diff"] / logit_step,
            "p99_logit_diff_steps": float(np.percentile(err_steps, 99)),
            "tolerance_steps": float(tolerance_steps),
            "within_tolerance": float((err_steps <= tolerance_steps).mean()),
            "decisive_samples": int(decisive.sum()),
            "decisive_top1_agreement": float(agree[decisive].mean()) if decisive.any() else 1.0,
        })
    return out


def judge(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT) -> str | None:
    """Why a comparison fails (None: faithful).

    With a logit step: at least `min_agreement` of images within the tolerance, and the same share of
    top-1 agreement on decisive images. A near-tie that flips on a rounding step is no failure; an
    error of many steps on many images is. Without one (foreign graphs): plain top-1 agreement.
    """
    if not report["finite"]:
        return "the exported model returns non-finite logits"
    n = report["samples"]
    if "within_tolerance" in report:
        if report["within_tolerance"] < min_agreement:
            return (f"the exported model's logits are within {report['tolerance_steps']:g} rounding steps "
                    f"({report['tolerance_steps'] * report['logit_step']:.3g}) of PyTorch's on only "
                    f"{report['within_tolerance']:.2%} of {n} held-out images (required {min_agreement:.1%}; max "
                    f"difference {report['max_abs_logit_diff_steps']:.1f} steps, {report['max_abs_logit_diff']:.4g})")
        if report["decisive_top1_agreement"] < min_agreement:
            return (f"the exported model agrees with PyTorch on {report['decisive_top1_agreement']:.2%} of the "
                    f"{report['decisive_samples']} held-out images whose decision is clear (required "
                    f"{min_agreement:.1%})")
        return None
    if report["top1_agreement"] < min_agreement:
        return (f"the exported model agrees with PyTorch on {report['top1_agreement']:.2%} of {n} held-out images "
                f"(required {min_agreement:.1%}; max logit difference {report['max_abs_logit_diff']:.4g})")
    return None


def verify_onnx(model_bytes: bytes | onnx.ModelProto, torch_model: nn.Module, x: torch.Tensor,
                y: torch.Tensor | None = None, *, logit_step: float | None = None,
                min_agreement: float = MIN_AGREEMENT, threads: int | None = None) -> dict[str, Any]:
    """Run the exported model in onnxruntime on `x` ([0,1] images) and compare with `torch_model`.

    With labels `y`, both models' accuracies are reported too. Raises VerificationError when the
    comparison fails `judge` (see there), naming the figures.
    """
    from rcdeploy.runtime.session import open_session, run_logits

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
    failure = judge(report, min_agreement)
    if failure:
        raise VerificationError(f"{failure}; nothing was written")
    return report


def kernel_report(model: bytes | onnx.ModelProto, layer_macs: Mapping[str, int] | None = None, *,
                  widen: bool = True) -> dict[str, Any]:
    """Op histogram of ORT's optimized graph, float conv count and the share of MACs in integer kernels.

    `layer_macs` maps the names of the exported Conv/Gemm nodes to their MACs per image; ORT keeps
    a fused node's name as a prefix (e.g. `blocks_0_conv1_0_Conv_token_4`), which is how each
    kernel is traced back to its layer.
    """
    from rcdeploy.runtime.session import optimized_graph

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
    report["int16_pairs"] = saturation_report(opt, layer_macs)
    return report


def saturation_report(opt: onnx.ModelProto, layer_macs: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The static int16 pair-sum proof of every integer kernel in onnxruntime's optimized graph
    (`rcdeploy.runtime.u8s8`), each kernel named by the exported layer it runs when it can be traced."""
    from rcdeploy.runtime.u8s8 import check_graph, summarize

    summary = summarize(check_graph(opt))
    names = sorted(layer_macs or {}, key=len, reverse=True)
    for row in summary["per_kernel"]:
        row["layer"] = next((n for n in names if row["node"] == n or row["node"].startswith(n + "_")), None)
    summary["can_saturate_layers"] = [r["layer"] or r["node"] for r in summary["per_kernel"] if r["can_saturate"]]
    return summary
