"""Check an export before it is written: onnxruntime vs the PyTorch quantized model, and what ORT really runs.

Both checks run the bytes that will ship, through the same loader the deploy stage uses
(`rcdeploy.runtime.session.open_session`, which widens packed INT4 weights in memory).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
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

# Stochastic graphs (RandomNormalLike: EnResNet's noise) are judged by distribution, not draw by draw.
# Each of STOCHASTIC_IMAGES images is run EOT_DRAWS times in both PyTorch and the exported model: 16
# draws make the standard error of an EOT-mean logit a quarter of the per-draw spread, and 256 x 16
# draws put the EOT accuracy's standard error near 0.3 points, at a cost of 16 verifications.
EOT_DRAWS = 16
STOCHASTIC_IMAGES = 256
# Allowed deviation of a mean, in standard errors (both sides' sampling noise); beyond the deterministic
# tolerance above. Four keeps a faithful export's false failures near 1e-4 per figure.
Z_SCORE = 4.0
# The per-draw spread of the logits (RMS over images and classes) must agree within this factor: the
# means alone cannot see a noise coefficient off by 25%.
SPREAD_FACTOR = 1.25


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


# -- stochastic graphs ----------------------------------------------------------------------------------


def noise_at_expectation(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every RandomNormalLike / RandomUniformLike replaced by its expectation (a constant of the
    same shape): the deterministic graph whose integer part the exact judgement can check. With mean-0
    noise, x + sigma * 0 is x bit for bit (finite x), so this is the trained network with the noise off."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type not in ("RandomNormalLike", "RandomUniformLike"):
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "RandomNormalLike":
            value = float(attrs.get("mean", 0.0))
        else:
            value = (float(attrs.get("low", 0.0)) + float(attrs.get("high", 1.0))) / 2
        # x - x: zeros of x's shape that every shape inference follows (qonnx's executor needs them all).
        zeros = f"{node.output[0]}__zeros" if value else node.output[0]
        nodes.append(onnx.helper.make_node("Sub", [node.input[0], node.input[0]], [zeros], name=node.name))
        if value:
            const = f"{node.output[0]}__value"
            out.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), const))
            nodes.append(onnx.helper.make_node("Add", [zeros, const], list(node.output)))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def torch_draws(model: nn.Module, x: torch.Tensor, draws: int, seed: int = 0) -> np.ndarray:
    """[draws, N, K] logits of a stochastic PyTorch model; a fixed seed (the caller's RNG is left alone)
    makes the export's figures reproducible on the PyTorch side."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return np.stack([torch_logits(model, x) for _ in range(draws)])


def compare_distributions(ref: np.ndarray, got: np.ndarray, y: np.ndarray | None = None,
                          logit_step: float | None = None, tolerance_steps: float = TOLERANCE_STEPS) -> dict[str, Any]:
    """Agreement figures of two stochastic models from [D, N, K] logit draws (PyTorch `ref`, exported `got`).

    Compared are the EOT means over the D draws: each image's worst |mean difference| beyond Z_SCORE
    standard errors (from both sides' per-draw variance) must stay within the deterministic tolerance
    of `compare_logits` (the integer graph's rounding); the EOT accuracies (mean over draws of per-draw
    accuracy) within Z_SCORE standard errors plus the (1 - MIN_AGREEMENT) share of decisions rounding
    may flip; and the per-draw spread (RMS std over images and classes) within SPREAD_FACTOR.
    """
    if ref.shape != got.shape or ref.ndim != 3:
        raise VerificationError(f"exported model returns logit draws of shape {list(got.shape)}, PyTorch "
                                f"{list(ref.shape)}")
    d = ref.shape[0]
    r, g = ref.astype(np.float64), got.astype(np.float64)
    mean_r, mean_g = r.mean(0), g.mean(0)
    var_r = r.var(0, ddof=1) if d > 1 else np.zeros_like(mean_r)
    var_g = g.var(0, ddof=1) if d > 1 else np.zeros_like(mean_g)
    se = np.sqrt((var_r + var_g) / d)
    out = compare_logits(mean_r, mean_g, logit_step, tolerance_steps)  # figures of the EOT means
    out["finite"] = bool(np.isfinite(g).all())
    if "tolerance_steps" in out:
        tolerance = out["tolerance_steps"] * out["logit_step"]
    else:
        tolerance = TOLERANCE_RANGE * out["logit_range"]
    excess = (np.abs(mean_r - mean_g) - Z_SCORE * se).max(1) if mean_r.size else np.zeros(0)
    decisive = np.zeros(len(mean_r), bool)
    if mean_r.shape[1] > 1 and len(mean_r):
        top2 = np.sort(mean_r, axis=1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * (tolerance + Z_SCORE * se.max(1))
    agree = mean_r.argmax(1) == mean_g.argmax(1)
    rms_r, rms_g = float(np.sqrt(var_r.mean())) if var_r.size else 0.0, float(np.sqrt(var_g.mean())) if var_g.size else 0.0
    out.update({
        "mode": "stochastic",
        "draws": int(d),
        "z_score": Z_SCORE,
        "tolerance": float(tolerance),
        "within_tolerance": float((excess <= tolerance).mean()) if len(excess) else 1.0,
        "max_excess_over_noise": float(excess.max()) if len(excess) else 0.0,
        "decisive_samples": int(decisive.sum()),
        "decisive_top1_agreement": float(agree[decisive].mean()) if decisive.any() else 1.0,
        "torch_spread": rms_r,
        "onnx_spread": rms_g,
        "spread_ratio": rms_g / rms_r if rms_r > 0 else (1.0 if rms_g == 0 else float("inf")),
        "spread_factor": SPREAD_FACTOR,
    })
    if y is not None and len(y):
        hit_r = (r.argmax(2) == y[None]).mean(0)  # per image: share of draws right
        hit_g = (g.argmax(2) == y[None]).mean(0)
        n = len(y)
        se_acc = float(np.sqrt((hit_r * (1 - hit_r)).sum() / max(d - 1, 1) + (hit_g * (1 - hit_g)).sum()
                               / max(d - 1, 1)) / n)
        out.update({"torch_accuracy": float(hit_r.mean()), "onnx_accuracy": float(hit_g.mean()),
                    "accuracy_se": se_acc, "accuracy_tolerance": Z_SCORE * se_acc + (1 - MIN_AGREEMENT)})
    return out


def judge_distributions(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT) -> str | None:
    """Why a stochastic comparison (`compare_distributions`) fails (None: faithful in distribution)."""
    if not report["finite"]:
        return "the exported model returns non-finite logits"
    n, d = report["samples"], report["draws"]
    if report["within_tolerance"] < min_agreement:
        return (f"the exported model's EOT-mean logits ({d} draws) are within {report['tolerance']:.3g} + "
                f"{report['z_score']:g} standard errors of PyTorch's on only {report['within_tolerance']:.2%} of "
                f"{n} held-out images (required {min_agreement:.1%}; worst excess {report['max_excess_over_noise']:.4g})")
    if report["decisive_top1_agreement"] < min_agreement:
        return (f"the exported model's EOT-mean decision agrees with PyTorch on {report['decisive_top1_agreement']:.2%}"
                f" of the {report['decisive_samples']} held-out images whose decision is clear (required "
                f"{min_agreement:.1%})")
    ratio = report["spread_ratio"]
    if not (1 / report["spread_factor"] <= ratio <= report["spread_factor"]):
        return (f"the exported model's noise spreads its logits {ratio:.2f}x as much as PyTorch's (RMS std "
                f"{report['onnx_spread']:.4g} vs {report['torch_spread']:.4g} over {d} draws; allowed "
                f"{1 / report['spread_factor']:.2f}x-{report['spread_factor']:.2f}x)")
    if "accuracy_tolerance" in report:
        gap = abs(report["onnx_accuracy"] - report["torch_accuracy"])
        if gap > report["accuracy_tolerance"]:
            return (f"the exported model's EOT accuracy {report['onnx_accuracy']:.2%} differs from PyTorch's "
                    f"{report['torch_accuracy']:.2%} by more than {report['accuracy_tolerance']:.2%} "
                    f"({report['z_score']:g} standard errors over {d} draws of {n} images, plus rounding)")
    return None


def check_distribution(run: Callable[[np.ndarray], np.ndarray], torch_model: nn.Module, x: torch.Tensor,
                       y: torch.Tensor | None = None, *, logit_step: float | None = None, draws: int = EOT_DRAWS,
                       min_agreement: float = MIN_AGREEMENT) -> dict[str, Any]:
    """`compare_distributions` of a stochastic exported model (`run`: images -> logits, one draw) against
    the PyTorch model with its noise on, over `draws` draws; VerificationError when it fails."""
    xs = x.detach().cpu().numpy()
    got = np.stack([run(xs) for _ in range(draws)])
    ref = torch_draws(torch_model, x, draws)
    report = compare_distributions(ref, got, None if y is None else y.detach().cpu().numpy(), logit_step)
    report["min_agreement"] = min_agreement
    failure = judge_distributions(report, min_agreement)
    if failure:
        raise VerificationError(f"{failure}; nothing was written")
    return report


def verify_stochastic_onnx(model_bytes: bytes | onnx.ModelProto, torch_model: nn.Module, x: torch.Tensor,
                           y: torch.Tensor | None = None, *, logit_step: float | None = None,
                           draws: int = EOT_DRAWS, images: int = STOCHASTIC_IMAGES,
                           min_agreement: float = MIN_AGREEMENT, threads: int | None = None) -> dict[str, Any]:
    """The verification of a stochastic export, two checks; VerificationError when either fails.

    1. Exact, noise off: the graph with its noise at the expectation (`noise_at_expectation`) against the
       PyTorch model with its noise disabled, on all of `x`, by `verify_onnx`'s unchanged rule.
    2. By distribution, noise on: `check_distribution` on the first `images` images, `draws` draws each.

    Returns the distribution report, with the exact one under "noise_off".
    """
    from rcdeploy.models.enresnet import noise_disabled
    from rcdeploy.runtime.session import open_session, run_logits

    proto = model_bytes if isinstance(model_bytes, onnx.ModelProto) else onnx.load_from_string(model_bytes)
    with noise_disabled(torch_model):
        exact = verify_onnx(noise_at_expectation(proto), torch_model, x, y, logit_step=logit_step,
                            min_agreement=min_agreement, threads=threads)
    session = open_session(proto, threads=threads)
    xs, ys = x[:images], (None if y is None else y[:images])
    report = check_distribution(lambda a: run_logits(session, a), torch_model, xs, ys, logit_step=logit_step,
                                draws=draws, min_agreement=min_agreement)
    report["noise_off"] = exact
    return report
