"""Lipschitz figures of a model's weight layers, for per-layer bit allocation (`train --bits auto`).

Our design (rcdeploy's reading of Song, Ranjan, Li, arXiv 2110.12308, whose text beyond the abstract is
not public; see ../shared/METHODS.md section 3):

* L_l, a layer's operator norm (L2 -> L2) as the linear map it is at deployment: BatchNorm folded in
  (W * gamma / sigma per output channel, the same fold the integer export does), a conv on the real
  input shape of that layer with its stride, padding, dilation and groups. Convs: power iteration on
  v -> J^T J v, with J^T from autograd (exactly the adjoint of the strided, padded conv, i.e. its
  conv_transpose). Linears: the exact largest singular value.
* A_l, the downstream amplification of an error at layer l's (folded) output: a bound on the Lipschitz
  constant from that point to the logits, summed over every path of the traced graph (path-sum rule,
  from the triangle inequality). A chain multiplies its layers' norms; a residual add sums its
  branches, so an identity-shortcut block contributes (1 + L_branch) and a projection-shortcut block
  (L_shortcut + L_branch). Activation quantizers and ReLU count 1 (ReLU is 1-Lipschitz; rounding is
  treated as the identity plus its own error, which is what is being allocated), max pooling
  sqrt(windows covering one input), average pooling its exact norm (global: 1/sqrt(H*W)).
* e_l(b), the quantization error of candidate bits b measured on PGD-adversarial activations:
  the mean over images of ||layer(a) - layer_b(a)||_2, with a the layer's input on adversarial images
  and layer_b its folded weights rounded to b bits (per output channel, narrow range, scale
  clip * max|w| / (2^(b-1) - 1): clip 1 is what a freshly built Brevitas layer of that width starts
  from; each clip ratio tried is a setting, and per bits the one with the least error is kept). The
  layer is linear, so this is ||(W - Q_b(W)) * a||. Measured on the adversarial activations, the
  error weighs most the input directions an attack actually drives, not those of clean images.
The allocator (`rcdeploy.quant.allocate`) then minimizes sum_l A_l e_l(b_l) under a byte budget.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import brevitas.nn as qnn
import torch
import torch.nn.functional as F
from torch import fx, nn

from rcdeploy.errors import UsageError
from rcdeploy.quant.spec import weight_layers

POWER_ITERATIONS = 100  # upper limit; stops earlier once the estimate changes by < POWER_TOL (relative)
POWER_TOL = 1e-5
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # of max |w| per output channel, tried at every bits
GAIN_PROBE_BITS = 4  # the width the measured gain quantizes one layer to


@dataclass
class LayerStats:
    """What `measure` finds for one weight layer (recorded in the checkpoint and model.json)."""

    name: str
    kind: str                      # "conv" or "linear"
    weights: int                   # weight count (bias excluded)
    out_channels: int
    input_shape: list[int]         # (C, H, W) or (features,), one image
    bn_folded: bool                # a BatchNorm that only reads this layer was folded into it
    norm: float                    # L_l, folded operator norm
    amplification: float = 1.0     # A_l, bound from this layer's folded output to the logits
    errors: dict[int, float] = field(default_factory=dict)  # bits -> e_l(b) at the best clip ratio, mean L2
                                                            # output error per image
    clips: dict[int, float] = field(default_factory=dict)   # bits -> that clip ratio
    unclipped: dict[int, float] = field(default_factory=dict)  # bits -> e_l(b) at clip 1 (max |w|)
    gain: float | None = None      # measured, not a bound: mean ||logit change|| / mean ||e_l|| with only this
                                   # layer quantized (at GAIN_PROBE_BITS), on the same images; a diagnostic of
                                   # how tight A_l is (rounding in later quantizers can push it above A_l)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("errors", "clips", "unclipped"):
            d[key] = {str(b): v for b, v in getattr(self, key).items()}
        return d


# ------------------------------------------------------------------------------------------ norms


def power_iteration(fn: Any, shape: Sequence[int], *, iters: int = POWER_ITERATIONS, tol: float = POWER_TOL,
                    seed: int = 0) -> float:
    """Largest singular value of the linear map `fn` on inputs of `shape` (one image, no batch dim).

    Iterates v <- J^T J v / ||J^T J v||, J^T applied by autograd (for a conv: its conv_transpose with
    the matching output padding), and returns ||J v|| at the last v (a lower bound that converges up).
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((1, *shape), generator=g, dtype=torch.float64)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        v.requires_grad_(True)
        y = fn(v)
        (u,) = torch.autograd.grad(y, v, y)  # J^T (J v)
        new_sigma = float(y.detach().norm())
        v = u.detach()
        n = v.norm()
        if n == 0:
            return 0.0
        v /= n
        if abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-30):
            return new_sigma
        sigma = new_sigma
    return sigma


def conv_norm(weight: torch.Tensor, input_shape: Sequence[int], *, stride: Any = 1, padding: Any = 0,
              dilation: Any = 1, groups: int = 1, **kw: Any) -> float:
    """Operator norm of conv2d(., weight) on (C, H, W) inputs (zero padding), by power iteration."""
    w = weight.detach().double().cpu()
    return power_iteration(lambda v: F.conv2d(v, w, None, stride, padding, dilation, groups), input_shape, **kw)


def linear_norm(weight: torch.Tensor) -> float:
    """Exact operator norm of a linear layer (its largest singular value)."""
    return float(torch.linalg.matrix_norm(weight.detach().double().cpu(), ord=2))


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """gamma / sigma per channel (eval statistics), the factor a fold multiplies output channels by."""
    sigma = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(sigma)
    return (gamma / sigma).cpu()


def folded_weight(layer: nn.Module, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """The layer's float weight with `bn`'s gamma / sigma folded into its output channels (float64)."""
    w = layer.weight.detach().double().cpu()
    if bn is None:
        return w
    return w * bn_scale(bn).view(-1, *([1] * (w.dim() - 1)))


def quantize_weight(w: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Round-to-nearest, narrow range, per-output-channel scale clip * max|w| / (2^(bits-1) - 1): at clip 1
    the grid a freshly built Brevitas layer of `bits` starts from (2 bits: ternary {-1, 0, 1} * scale);
    below 1, weights beyond clip * max|w| saturate and the rest round more finely."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().flatten(1).amax(1).clamp_min(1e-30).view(-1, *([1] * (w.dim() - 1)))
    scale = clip * amax / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


# ------------------------------------------------------------------------------ graph and amplification


def _owned_bns(gm: fx.GraphModule) -> dict[str, str]:
    """weight layer name -> the BatchNorm that alone reads its output (the fold export does)."""
    owned = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and isinstance(gm.get_submodule(src.target), (qnn.QuantConv2d, qnn.QuantLinear))):
                owned[str(src.target)] = str(node.target)
    return owned


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _maxpool_gain(m: nn.MaxPool2d) -> float:
    """sqrt of the most windows one input falls in: |max a - max b| <= ||a - b|| over each window."""
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
    s = m.stride if m.stride is not None else m.kernel_size
    s = s if isinstance(s, tuple) else (s, s)
    d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation, m.dilation)
    span = [(k[i] - 1) * d[i] + 1 for i in range(2)]
    return math.sqrt(math.prod(max(1, min(k[i], math.ceil(span[i] / s[i]))) for i in range(2)))


_PASS_MODULES = (qnn.QuantReLU, qnn.QuantIdentity, nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {torch.flatten, torch.relu, F.relu, torch.cat}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous", "relu"}


def _gains(gm: fx.GraphModule, node: fx.Node, norms: dict[str, float], owned: dict[str, str]) -> dict[fx.Node, float]:
    """Lipschitz constant of `node`'s output with respect to each of its tensor inputs (the others fixed)."""
    tensor_args = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        x = node.args[0]
        if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear)):
            return {x: norms[str(node.target)]}  # folded: its BatchNorm below counts 1
        if isinstance(m, nn.BatchNorm2d):
            folded = str(node.target) in owned.values()
            return {x: 1.0 if folded else float(bn_scale(m).abs().max())}
        if isinstance(m, _PASS_MODULES):
            return {x: 1.0}
        if isinstance(m, nn.MaxPool2d):
            return {x: _maxpool_gain(m)}
        if isinstance(m, nn.AdaptiveMaxPool2d) and m.output_size in (1, (1, 1)):
            return {x: 1.0}
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return {x: power_iteration(lambda v: m(v), _shape(x)[1:])}
        if type(m).__name__ == "Normalize":
            return {x: float((1.0 / m.std.detach().double()).abs().max())}
        raise UsageError(f"--bits auto: no Lipschitz bound for layer {node.target} ({type(m).__name__})")
    if node.op == "call_function":
        if node.target in (operator.add, torch.add):
            gains: dict[fx.Node, float] = {}
            for a in tensor_args:  # x + x counts twice
                gains[a] = gains.get(a, 0.0) + 1.0
            return gains
        if node.target in (operator.mul, torch.mul, operator.truediv) and len(tensor_args) == 1:
            other = node.args[1] if node.args[0] is tensor_args[0] else node.args[0]
            if isinstance(other, (int, float)):
                c = abs(other) if node.target is not operator.truediv else 1.0 / abs(other)
                return {tensor_args[0]: float(c)}
        if node.target in _PASS_FUNCTIONS:
            return {a: 1.0 for a in tensor_args}
    if node.op == "call_method" and node.target in _PASS_METHODS:
        return {node.args[0]: 1.0}
    raise UsageError(f"--bits auto: no Lipschitz bound for the operation {node.op} {node.target!s} "
                     f"({node.name}); supported: conv, linear, BatchNorm, ReLU, quantizers, pooling, add, flatten")


def amplification(gm: fx.GraphModule, norms: dict[str, float], owned: dict[str, str]) -> dict[str, float]:
    """A_l for every weight layer: the path-sum bound from its folded output to the logits.

    U(output) = 1; U(n) = sum over users u of U(u) * gain(u wrt n), in reverse topological order.
    The error of layer l enters at its BatchNorm's output when it has one, else at its own.
    """
    nodes = list(gm.graph.nodes)
    bound: dict[fx.Node, float] = {}
    gains: dict[fx.Node, dict[fx.Node, float]] = {}
    for node in reversed(nodes):
        if node.op == "output":
            continue
        total = 0.0
        for user in node.users:
            if user.op == "output":
                total += 1.0
            elif bound.get(user):  # a user that cannot reach the logits (bound 0) adds nothing
                if user not in gains:
                    gains[user] = _gains(gm, user, norms, owned)
                total += bound[user] * gains[user].get(node, 0.0)
        bound[node] = total
    by_name = {str(n.target): n for n in nodes if n.op == "call_module"}
    return {name: bound[by_name[owned.get(name, name)]] for name in norms}


# -------------------------------------------------------------------------------------------- measure


def _layer_input(node: fx.Node) -> tuple[int, ...]:
    shape = _shape(node.args[0])
    assert shape is not None, f"no shape recorded for the input of {node.target}"
    return tuple(shape[1:])


@torch.no_grad()
def measure(model: nn.Module, x_adv: torch.Tensor, bits: Sequence[int], *, clips: Sequence[float] = (1.0,),
            batch: int = 128, layers: Sequence[str] | None = None) -> list[LayerStats]:
    """Norms, amplification and per-bits quantization errors of `model`'s weight layers (eval mode).

    x_adv: adversarial images (from the training split) whose activations the errors are measured on.
    clips: clip ratios tried at every bits (the error kept is the least; 1.0 should be among them).
    layers: names to measure errors for (default all; norms and amplification are always computed).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from rcdeploy.models.trace import trace

    was_training = model.training
    model.eval()
    try:
        gm = trace(model)
        ShapeProp(gm).propagate(x_adv[:1])
        owned = _owned_bns(gm)
        nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
        stats: dict[str, LayerStats] = {}
        folded: dict[str, torch.Tensor] = {}
        for name, m in weight_layers(model):
            bn = gm.get_submodule(owned[name]) if name in owned else None
            w = folded_weight(m, bn)
            folded[name] = w
            shape = _layer_input(nodes[name])
            if isinstance(m, qnn.QuantConv2d):
                if m.padding_mode != "zeros":
                    raise UsageError(f"--bits auto: {name} pads with {m.padding_mode!r}; only zero padding is bounded")
                with torch.enable_grad():
                    norm = conv_norm(w, shape, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                     groups=m.groups)
                kind = "conv"
            else:
                norm, kind = linear_norm(w), "linear"
            stats[name] = LayerStats(name=name, kind=kind, weights=int(m.weight.numel()),
                                     out_channels=int(m.weight.shape[0]), input_shape=list(shape),
                                     bn_folded=bn is not None, norm=norm)
        with torch.enable_grad():
            amp = amplification(gm, {n: s.norm for n, s in stats.items()}, owned)
        for name, s in stats.items():
            s.amplification = amp[name]
        wanted = [n for n in stats if layers is None or n in layers]
        chosen = {n: (dict(weight_layers(model))[n], folded[n]) for n in wanted}
        _errors(model, x_adv, bits, clips, batch, chosen, stats)
        _gains_measured(model, x_adv, batch, {n: m for n, (m, _) in chosen.items()}, stats)
    finally:
        model.train(was_training)
    return list(stats.values())


def _gains_measured(model: nn.Module, x_adv: torch.Tensor, batch: int, layers: dict[str, nn.Module],
                    stats: dict[str, LayerStats]) -> None:
    """Per layer: quantize only it (clip 1, GAIN_PROBE_BITS), and divide the mean logit change by the mean
    change of its own output (measured by `_errors` at the same setting)."""
    def logits() -> torch.Tensor:
        return torch.cat([model(x_adv[i:i + batch]) for i in range(0, len(x_adv), batch)])

    ref = logits()
    for name, m in layers.items():
        own = stats[name].unclipped.get(GAIN_PROBE_BITS)
        if not own:
            continue
        saved = m.weight.detach().clone()
        try:
            with torch.no_grad():
                m.weight.copy_(quantize_weight(saved.double(), GAIN_PROBE_BITS).to(saved.dtype))
            change = (logits() - ref).flatten(1).norm(dim=1).mean()
        finally:
            with torch.no_grad():
                m.weight.copy_(saved)
        stats[name].gain = float(change) / own


def _errors(model: nn.Module, x_adv: torch.Tensor, bits: Sequence[int], clips: Sequence[float], batch: int,
            layers: dict[str, tuple[nn.Module, torch.Tensor]], stats: dict[str, LayerStats]) -> None:
    """e_l(b) for every layer in `layers` and setting (bits, clip): forward hooks see each layer's real input
    on `x_adv`; per bits the clip with the least error is kept."""
    settings = [(b, c) for b in bits for c in clips]
    deltas = {name: {k: (w - quantize_weight(w, *k)).float() for k in settings} for name, (_, w) in layers.items()}
    sums = {name: {k: 0.0 for k in settings} for name in layers}

    def hook_for(name: str, m: nn.Module):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            a = inputs[0]
            a = getattr(a, "value", a)  # a QuantTensor carries its dequantized value
            for b, dw in deltas[name].items():
                dw = dw.to(a.device)
                if isinstance(m, qnn.QuantConv2d):
                    err = F.conv2d(a.float(), dw, None, m.stride, m.padding, m.dilation, m.groups)
                else:
                    err = F.linear(a.float(), dw)
                sums[name][b] += float(err.flatten(1).norm(dim=1).sum())
        return hook

    handles = [m.register_forward_hook(hook_for(name, m)) for name, (m, _) in layers.items()]
    try:
        for i in range(0, len(x_adv), batch):
            model(x_adv[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    n = max(1, len(x_adv))
    for name in layers:
        s = stats[name]
        for b in bits:
            best = min(clips, key=lambda c: (sums[name][(b, c)], -c))  # ties: the wider range
            s.errors[b], s.clips[b] = sums[name][(b, best)] / n, float(best)
            if 1.0 in clips:
                s.unclipped[b] = sums[name][(b, 1.0)] / n
