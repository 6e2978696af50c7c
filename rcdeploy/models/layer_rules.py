"""One rule per layer type: what a module does to channels, how it is sliced, how it is written as integers.

Three fx walks read the same leaf layers: the channel tracer (`rcdeploy.models.channels`), physical
channel removal (`rcdeploy.export.shrink`) and the integer QDQ writer (`rcdeploy.export.qdq`). Each
used to classify Brevitas and torch layers with its own isinstance ladder; here one `LayerRule` per
module type answers all three, so a new layer type is one class:

- `channels`: how the layer moves channel spaces (makes a new one, passes it through, or refuses);
- `slice`: a smaller copy keeping some input and output channels (only `indexed` layers: conv, linear,
  BatchNorm, whose parameters are indexed by channels);
- `emit`: the layer in the integer graph, written through the writer's small `IntegerGraph` surface
  (the writer owns the Q/DQ pairs, weight forms and BatchNorm folding; a rule only says which of them
  its layer is, as onnxruntime's QDQ op quantizers mark tensors and one quantizer writes Q/DQ).

The base class refuses everything, so a rule opts into each consumer explicitly: a type the tracer
passes through but the integer graph has no mapping for (nn.ReLU, Dropout, AvgPool2d ...) is refused by
the writer with the same message as an unknown type. Types with no rule are refused by all three.
Anchors: Torch-Pruning's `BasePruningFunc` + per-type registry, Brevitas' export handlers
(`handled_layer`), onnxruntime's `QDQRegistry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import brevitas.nn as qnn
import numpy as np
import torch
from torch import fx, nn

from rcdeploy.errors import UsageError
from rcdeploy.models.common import Normalize

# -- what the three consumers offer a rule -------------------------------------------------------------


@dataclass(frozen=True)
class ChannelFlow:
    """A traced feature map: the channel space of its channel axis, and its layout."""

    space: int
    gap: bool = False  # spatial extent is 1x1 (after a global pool): flatten keeps channel indices
    flat: bool = False  # a [N, C] tensor (after flatten or a linear layer): what a linear layer may read


class ChannelTrace(Protocol):
    """What the channel tracer lets a rule do (spaces are union-find ids; see `rcdeploy.models.channels`)."""

    def refuse(self, node: fx.Node, why: str) -> Exception: ...
    def check_size(self, node: fx.Node, space: int, expected: int) -> None: ...
    def new_space(self, size: int) -> int: ...
    def fix(self, space: int, reason: str) -> None: ...
    def module_of(self, node: fx.Node) -> nn.Module | None: ...
    def add_layer(self, name: str, kind: str, in_space: int, out_space: int) -> None: ...
    def add_producer(self, name: str, space: int, depthwise: bool) -> None: ...
    def add_bn(self, name: str, space: int, owner: str | None) -> None: ...


class IntegerGraph(Protocol):
    """What the integer QDQ writer lets a rule do. Values are the writer's own (float, uint8, pending)."""

    def is_quantized(self, x: Any) -> bool: ...
    def requantize(self, name: str, m: nn.Module, x: Any, *, relu: bool) -> Any: ...
    def weight_layer(self, name: str, m: nn.Module, x: Any, users: int, rule: WeightRule) -> Any: ...
    def fold_batch_norm(self, x: Any, m: nn.BatchNorm2d, users: int) -> Any | None: ...
    def float_ops(self, name: str, x: Any, steps: Sequence[tuple[str, str, np.ndarray, str]]) -> Any: ...
    def mark_float_affine(self, name: str) -> None: ...
    def unary(self, op: str, name: str, x: Any, *, on_uint8: bool, **attrs: Any) -> Any: ...
    def flatten(self, x: Any, start: int, end: int, name: str) -> Any: ...


def no_integer_mapping(name: str, m: nn.Module) -> UsageError:
    return UsageError(f"module {name} ({type(m).__name__}) has no integer-ONNX mapping; export with --format qonnx")


# -- the rule interface and its registry ---------------------------------------------------------------


class LayerRule:
    """How one module type behaves in the channel tracer, shrink and the integer writer (refuses by default)."""

    # Parameters indexed by channels (conv, linear, BatchNorm): listed in ChannelGraph.layers, sliced by
    # shrink, and never called twice (a shared layer's channels could not be removed for one call only).
    indexed: ClassVar[bool] = False
    # A BatchNorm that alone reads this layer's output belongs to it (export folds it; the pruner scores
    # the channel by its gamma).
    owns_next_bn: ClassVar[bool] = False
    macs_need_out_hw: ClassVar[bool] = False  # `macs` reads the output's spatial size (convs)

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        raise t.refuse(node, f"unknown module type {type(m).__name__}")

    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        raise no_integer_mapping(name, m)

    def slice(self, m: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
        raise NotImplementedError(f"{type(m).__name__} has no channel-indexed parameters to slice")

    def widths(self, m: nn.Module) -> tuple[int, int]:
        """(input, output) channel counts of an indexed layer."""
        raise NotImplementedError(type(m).__name__)

    def macs(self, m: nn.Module, out_hw: tuple[int, int] | None) -> int | None:
        """Multiply-accumulates per image (None: not a MAC layer, or the spatial size is unknown)."""
        return None


LAYER_RULES: dict[type[nn.Module], LayerRule] = {}
_R = TypeVar("_R", bound=type[LayerRule])


def layer_rule(*types: type[nn.Module], **kwargs: Any) -> Callable[[_R], _R]:
    """Class decorator: register one instance of the rule (built with `kwargs`) for each module type."""

    def register(cls: _R) -> _R:
        for t in types:
            LAYER_RULES[t] = cls(**kwargs)
        return cls

    return register


def rule_for(m: nn.Module) -> LayerRule | None:
    """The rule of `m`'s most specific registered class (as an isinstance ladder would find it), or None."""
    for cls in type(m).__mro__:
        rule = LAYER_RULES.get(cls)
        if rule is not None:
            return rule
    return None


# -- layers with channel-indexed parameters --------------------------------------------------------------


def _injectors(layer: nn.Module) -> dict:
    """The quantizer injectors a Brevitas layer was built with, to build a same-quantized sibling."""
    return {k: getattr(layer, k).quant_injector for k in ("weight_quant", "bias_quant", "input_quant", "output_quant")}


def _sliced_state(layer: nn.Module, keep_in: torch.Tensor | None, keep_out: torch.Tensor) -> dict:
    """The state dict of a conv/linear with rows `keep_out` and (unless None) input columns `keep_in`."""
    out_before = layer.weight.shape[0]
    state = {}
    for key, t in layer.state_dict().items():
        if key == "weight":
            t = t[keep_out.to(t.device)]
            if keep_in is not None:
                t = t[:, keep_in.to(t.device)]
        elif key == "bias":
            t = t[keep_out.to(t.device)]
        elif key.startswith(("weight_quant.", "bias_quant.")) and t.dim() >= 1 and t.shape[0] == out_before \
                and t.numel() > 1:
            t = t[keep_out.to(t.device)]  # per-output-channel quantizer state: sliced, not recomputed
        state[key] = t.clone()
    return state


def _loaded_like(new: nn.Module, layer: nn.Module, state: dict) -> nn.Module:
    new.load_state_dict(state, strict=True)  # strict: any unsliced per-channel state fails loudly here
    old_grad = {n: p.requires_grad for n, p in layer.named_parameters()}
    for n, p in new.named_parameters():
        p.requires_grad_(old_grad.get(n, True))
    return new.train(layer.training)


def _device_dtype(layer: nn.Module) -> dict:
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


class WeightRule(LayerRule):
    """A Brevitas conv or linear: makes a channel space, written as a QDQ Conv/Gemm with per-channel weights."""

    indexed = True
    onnx_op: ClassVar[str]
    float_output_op: ClassVar[str | None] = None  # op for an integer layer whose output stays float, if any
    names_weight_zero_point: ClassVar[bool] = False  # the int8 weight DQ must name its zero point to fuse

    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        if not g.is_quantized(x):
            raise UsageError(f"layer {name} reads an unquantized tensor; put a quantizer in front of it "
                             "(the integer export needs quantized inputs to every conv and linear layer)")
        if m.input_quant.is_quant_enabled or m.output_quant.is_quant_enabled or m.bias_quant.is_quant_enabled:
            raise UsageError(f"layer {name} has its own input/output/bias quantizer, which the integer export "
                             "does not map; use --format qonnx")
        self.check_integer_export(m, name)
        return g.weight_layer(name, m, x, users, self)

    def check_integer_export(self, m: nn.Module, name: str) -> None:
        """Refuse what the integer writer cannot map (after the checks every weight layer shares)."""

    def onnx_attrs(self, m: nn.Module, name: str) -> dict[str, Any]:
        return {}

    def geometry(self, m: nn.Module) -> tuple[str, list[int], list[int], int]:
        """(op, kernel, stride, groups) as the export's layer list reports them."""
        raise NotImplementedError


@layer_rule(qnn.QuantConv2d)
class QuantConvRule(WeightRule):
    """A full conv makes a new space (its output channels); a depthwise conv (groups == in == out) passes
    its space through, since its output channel c reads only input channel c."""

    onnx_op = "Conv"
    float_output_op = "ConvInteger"
    owns_next_bn = True
    macs_need_out_hw = True

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        name = str(node.target)
        t.check_size(node, x.space, m.in_channels)
        if m.groups == 1:
            out = t.new_space(m.out_channels)
            t.add_layer(name, "conv", x.space, out)
            t.add_producer(name, out, False)
            return ChannelFlow(out)
        if m.groups == m.in_channels == m.out_channels:
            t.add_layer(name, "depthwise", x.space, x.space)
            t.add_producer(name, x.space, True)
            return ChannelFlow(x.space)
        raise t.refuse(node, f"grouped conv (groups={m.groups}) is not supported")

    def slice(self, m: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
        depthwise = m.groups != 1  # the tracer refuses every other grouped conv
        n_in = len(keep_out) if depthwise else len(keep_in)
        new = qnn.QuantConv2d(n_in, len(keep_out), m.kernel_size, stride=m.stride, padding=m.padding,
                              dilation=m.dilation, groups=len(keep_out) if depthwise else 1,
                              bias=m.bias is not None, padding_mode=m.padding_mode,
                              return_quant_tensor=m.return_quant_tensor, **_injectors(m), **_device_dtype(m))
        return _loaded_like(new, m, _sliced_state(m, None if depthwise else keep_in, keep_out))

    def widths(self, m: nn.Module) -> tuple[int, int]:
        return m.in_channels, m.out_channels

    def macs(self, m: nn.Module, out_hw: tuple[int, int] | None) -> int | None:
        if out_hw is None:
            return None
        kh, kw = m.kernel_size
        return out_hw[0] * out_hw[1] * m.out_channels * (m.in_channels // m.groups) * kh * kw

    def check_integer_export(self, m: nn.Module, name: str) -> None:
        if len(m.kernel_size) != 2:
            raise UsageError(f"layer {name}: only 2-d convolutions export")

    def onnx_attrs(self, m: nn.Module, name: str) -> dict[str, Any]:
        if isinstance(m.padding, str):
            raise UsageError(f"layer {name}: string padding {m.padding!r} is not supported by the integer export")
        if m.padding_mode != "zeros":
            raise UsageError(f"layer {name}: padding mode {m.padding_mode!r} is not supported (zeros only)")
        ph, pw = m.padding
        return dict(kernel_shape=list(m.kernel_size), strides=list(m.stride), pads=[ph, pw, ph, pw],
                    dilations=list(m.dilation), group=m.groups)

    def geometry(self, m: nn.Module) -> tuple[str, list[int], list[int], int]:
        return "conv", list(m.kernel_size), list(m.stride), m.groups


@layer_rule(qnn.QuantLinear)
class QuantLinearRule(WeightRule):
    """A linear layer makes a new space; it may only read a [N, C] tensor flattened after global pooling."""

    onnx_op = "Gemm"
    # onnxruntime 1.31 fuses DQ -> Gemm into QGemm only when the weight DQ names its zero point
    # (DQ -> Conv fuses without one, so convolutions save those bytes).
    names_weight_zero_point = True

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        if not x.flat:
            raise t.refuse(node, "linear layer on a feature map not flattened after global pooling")
        t.check_size(node, x.space, m.in_features)
        out = t.new_space(m.out_features)
        t.add_layer(str(node.target), "linear", x.space, out)
        t.add_producer(str(node.target), out, False)
        return ChannelFlow(out, flat=True)

    def slice(self, m: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
        new = qnn.QuantLinear(len(keep_in), len(keep_out), bias=m.bias is not None,
                              return_quant_tensor=m.return_quant_tensor, **_injectors(m), **_device_dtype(m))
        return _loaded_like(new, m, _sliced_state(m, keep_in, keep_out))

    def widths(self, m: nn.Module) -> tuple[int, int]:
        return m.in_features, m.out_features

    def macs(self, m: nn.Module, out_hw: tuple[int, int] | None) -> int | None:
        return m.in_features * m.out_features

    def onnx_attrs(self, m: nn.Module, name: str) -> dict[str, Any]:
        return dict(alpha=1.0, beta=1.0, transA=0, transB=1)

    def geometry(self, m: nn.Module) -> tuple[str, list[int], list[int], int]:
        return "linear", [1], [1], 1


@layer_rule(nn.BatchNorm2d)
class BatchNormRule(LayerRule):
    """Passes its space through. A BN that alone reads a conv's output belongs to that conv (`owns_next_bn`);
    any other BN (PreAct: BN before a conv) stays a per-channel float affine in the integer graph."""

    indexed = True

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        name = str(node.target)
        t.check_size(node, x.space, m.num_features)
        t.add_layer(name, "bn", x.space, x.space)
        t.add_bn(name, x.space, self._owner(t, node))
        return x

    @staticmethod
    def _owner(t: ChannelTrace, node: fx.Node) -> str | None:
        src = node.args[0]
        mod = t.module_of(src)
        rule = rule_for(mod) if mod is not None else None
        return str(src.target) if rule is not None and rule.owns_next_bn and len(src.users) == 1 else None

    def slice(self, m: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
        new = nn.BatchNorm2d(len(keep_out), eps=m.eps, momentum=m.momentum, affine=m.affine,
                             track_running_stats=m.track_running_stats, **_device_dtype(m))
        state = {k: (t[keep_out.to(t.device)] if t.dim() >= 1 else t).clone() for k, t in m.state_dict().items()}
        return _loaded_like(new, m, state)

    def widths(self, m: nn.Module) -> tuple[int, int]:
        return m.num_features, m.num_features

    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        folded = g.fold_batch_norm(x, m, users)
        if folded is not None:
            return folded
        # BatchNorm not after a conv (PreAct blocks): folding into the next conv is not exact at
        # zero-padded borders, so it stays a per-channel float affine between DQ and Q.
        sigma = np.sqrt(m.running_var.detach().double().cpu().numpy() + m.eps)
        gamma = m.weight.detach().double().cpu().numpy() if m.affine else np.ones_like(sigma)
        beta = m.bias.detach().double().cpu().numpy() if m.affine else np.zeros_like(sigma)
        mu = m.running_mean.detach().double().cpu().numpy()
        mul = (gamma / sigma).astype(np.float32).reshape(1, -1, 1, 1)
        add = (beta - gamma * mu / sigma).astype(np.float32).reshape(1, -1, 1, 1)
        g.mark_float_affine(name)
        return g.float_ops(name, x, (("Mul", "bnm", mul, "mul"), ("Add", "bna", add, "add")))


# -- layers that pass a channel space through ------------------------------------------------------------


@layer_rule(qnn.QuantReLU, relu=True)
@layer_rule(qnn.QuantIdentity, relu=False)
class ActQuantRule(LayerRule):
    """A per-tensor activation quantizer: maps 0 to 0, so it passes channels through; in the integer graph
    it is the QuantizeLinear of the value before it (unsigned with zero point 0, it is also the ReLU)."""

    def __init__(self, relu: bool) -> None:
        self.relu = relu

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        for pname, v in list(m.named_parameters()) + list(m.named_buffers()):
            if v.numel() > 1:
                raise t.refuse(node, f"activation quantizer with a per-channel state ({pname})")
        return x

    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        return g.requantize(name, m, x, relu=self.relu)


@layer_rule(Normalize)
class NormalizeRule(LayerRule):
    """(x - mean) / std per input channel: the image channels can never be removed."""

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        t.fix(x.space, "network input")
        return x

    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        mean = m.mean.detach().cpu().numpy().astype(np.float32)
        std = m.std.detach().cpu().numpy().astype(np.float32)
        return g.float_ops(name, x, (("Sub", "mean", mean, "sub"), ("Div", "std", std, "div")))


@layer_rule(nn.ReLU)
@layer_rule(nn.ReLU6)
@layer_rule(nn.Dropout)
@layer_rule(nn.AvgPool2d)
class PassRule(LayerRule):
    """A per-channel op that maps 0 to 0 and needs no slicing (no integer mapping unless a subclass says)."""

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        return x


@layer_rule(nn.Identity)
class IdentityRule(PassRule):
    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        return x


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@layer_rule(nn.MaxPool2d)
class MaxPoolRule(PassRule):
    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        p = _pair(m.padding)
        d = _pair(m.dilation)
        # Max commutes with a monotonic quantizer: a uint8 input is pooled as is.
        return g.unary("MaxPool", name, x, on_uint8=True, kernel_shape=list(k), strides=list(s),
                       pads=[p[0], p[1], p[0], p[1]], dilations=list(d), ceil_mode=int(m.ceil_mode))


@layer_rule(nn.AdaptiveMaxPool2d)
class AdaptivePoolRule(LayerRule):
    """Adaptive pooling passes channels through; to output size 1 it makes the map 1x1, so a flatten after
    it keeps channel indices."""

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        size = m.output_size
        gap = size == 1 if isinstance(size, int) else tuple(size) == (1, 1)
        return ChannelFlow(x.space, gap or x.gap)


@layer_rule(nn.AdaptiveAvgPool2d)
class AdaptiveAvgPoolRule(AdaptivePoolRule):
    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        if tuple(size) != (1, 1):
            raise UsageError(f"{name}: only global average pooling (output size 1) exports")
        return g.unary("GlobalAveragePool", name, x, on_uint8=False)


@layer_rule(nn.Flatten)
class FlattenRule(LayerRule):
    """Flatten keeps channel indices only from dim 1 of a 1x1 map (after global pooling)."""

    def channels(self, t: ChannelTrace, node: fx.Node, m: nn.Module, x: ChannelFlow) -> ChannelFlow:
        if m.start_dim != 1 or not x.gap:
            raise t.refuse(node, "flatten is supported only from dim 1 after global pooling")
        return ChannelFlow(x.space, True, True)

    def emit(self, g: IntegerGraph, name: str, m: nn.Module, x: Any, users: int) -> Any:
        return g.flatten(x, m.start_dim, m.end_dim, name)
