"""The one channel-dependency tracer: which channels of which layers must be pruned together.

A *channel space* is the channel axis of a tensor. Convs and linears make new spaces (their output
channels); BatchNorm, activations, quantizers, pooling and flatten-after-global-pool pass a space
through; a residual add merges the spaces of its two inputs (union-find); a depthwise conv passes its
space through (its output channel c reads only input channel c). A `ChannelGroup` is one merged space
with everything indexed by it:

- producers: convs/linears writing the channels (their weight rows), each with the BatchNorm that alone
  reads its output, if any;
- bns: every BatchNorm on the space, whether right after a producer or before a consumer (PreAct);
- consumers: convs/linears reading the channels as inputs (their weight columns).

Channel c of a group is *removable* only when its value is exactly 0 everywhere it flows: every
producer row (weight and bias) is zero, and every BatchNorm on the space has gamma = beta = 0. A BN
that reads a zero channel outputs beta - gamma * mean / sqrt(var + eps), not 0, so PreAct-style
BN-before-conv needs those BNs zeroed too; a zeroed BN after a conv outputs 0 whatever the conv does.
Zero then stays zero through ReLU, every quantizer (zero is always representable) and pooling, and the
consumers' columns for c multiply zeros, so dropping c everywhere leaves every output unchanged. A
producer with no BN of its own must itself output 0: a binary weight quantizer maps a zero row to
+-scale, never 0, so such rows never count as zero.

Why not Torch-Pruning: it classifies layers by isinstance on torch.nn types, so a Brevitas QuantConv2d
would be pruned as a plain Conv2d (weight and bias sliced) while the per-output-channel scale inside its
weight quantizer is a parameter it does not know to slice; it also traces through autograd, where the
quantizers' own ops appear. Making it reliable would take custom pruners for every Brevitas layer plus a
new dependency; an fx pass over our fixed set of leaf layers is short, and it refuses anything unknown
(naming the node) instead of mis-pruning it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import brevitas.nn as qnn
import torch
import torch.nn.functional as F
from brevitas.inject.enum import QuantType
from torch import fx, nn

from rcdeploy.errors import UsageError
from rcdeploy.models.common import Normalize
from rcdeploy.models.trace import trace

WEIGHT_TYPES = (qnn.QuantConv2d, qnn.QuantLinear)
ACT_QUANT_TYPES = (qnn.QuantReLU, qnn.QuantIdentity)
# Per-channel ops that map 0 to 0 and need no slicing: they pass a channel space through unchanged.
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = (torch.relu, F.relu, torch.nn.functional.relu6, F.max_pool2d, F.avg_pool2d)
PASS_METHODS = ("relu", "contiguous")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class ChannelTraceError(UsageError):
    """The model has an op the channel tracer cannot account for; nothing was pruned."""


@dataclass(frozen=True)
class Producer:
    name: str  # conv / linear module name
    bn: str | None  # the BatchNorm that alone reads this layer's output, if any
    depthwise: bool = False  # a depthwise conv: its input channel c is also this group's channel c


@dataclass
class ChannelGroup:
    """One set of coupled channels (see the module docstring). Helpers take the model: pass it, don't bind it."""

    index: int
    size: int
    prunable: bool
    reason: str = ""  # why not prunable
    producers: list[Producer] = field(default_factory=list)
    bns: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # layers reading the channels (not depthwise)

    @property
    def label(self) -> str:
        """A short stable name: the first producer (in graph order)."""
        return self.producers[0].name if self.producers else f"group{self.index}"

    @property
    def layer_names(self) -> list[str]:
        return [p.name for p in self.producers] + self.bns + self.consumers

    # -- parameters indexed by this group's channels (always along dim 0) ----------------------
    def function_params(self, model: nn.Module) -> list[torch.Tensor]:
        """Parameters that set each channel's value: rows of producers with no BN of their own, and every
        BN's gamma and beta. Rows of a conv followed by its own BN are left out: the BN normalizes them
        away (scale invariant), so only gamma/beta say how much the channel matters."""
        out: list[torch.Tensor] = []
        for p in self.producers:
            if p.bn is None:
                out.extend(_weight_and_bias(model.get_submodule(p.name)))
        for name in self.bns:
            bn = model.get_submodule(name)
            out.extend(t for t in (bn.weight, bn.bias) if t is not None)
        return out

    def follower_params(self, model: nn.Module) -> list[torch.Tensor]:
        """Rows of producers that have their own BN: zeroed with the channel, irrelevant to its value."""
        out: list[torch.Tensor] = []
        for p in self.producers:
            if p.bn is not None:
                out.extend(_weight_and_bias(model.get_submodule(p.name)))
        return out

    def all_params(self, model: nn.Module) -> list[torch.Tensor]:
        return self.function_params(model) + self.follower_params(model)

    def norms(self, model: nn.Module, *, function_only: bool = True) -> torch.Tensor:
        """Per-channel L2 norm over the group's channel parameters (float32, detached)."""
        params = self.function_params(model) if function_only else self.all_params(model)
        return _channel_sq_norms(params, self.size).sqrt()

    def params_per_channel(self, model: nn.Module, *, function_only: bool = True) -> int:
        params = self.function_params(model) if function_only else self.all_params(model)
        return sum(t[0].numel() for t in params)

    def consumer_norms(self, model: nn.Module) -> torch.Tensor:
        """Per-channel L2 norm of the consumers' input columns (how much downstream reads each channel)."""
        sq = None
        for name in self.consumers:
            w = model.get_submodule(name).weight.detach().float()
            col = w.transpose(0, 1).reshape(self.size, -1).pow(2).sum(1)
            sq = col if sq is None else sq + col
        return torch.zeros(self.size) if sq is None else sq.sqrt().cpu()

    def alive(self, model: nn.Module) -> torch.Tensor:
        """Bool [size] on the CPU: True where the channel may carry a non-zero value (must be kept)."""
        if not self.prunable:
            return torch.ones(self.size, dtype=torch.bool)
        zero = _channel_sq_norms(self.all_params(model), self.size) == 0
        for p in self.producers:
            if p.bn is None and not zero_row_outputs_zero(model.get_submodule(p.name)):
                zero[:] = False
        return ~zero

    @torch.no_grad()
    def zero_(self, model: nn.Module, channels: torch.Tensor) -> None:
        """Zero channels (bool mask or index tensor) on every producer row and every BN of the group."""
        if not self.prunable:
            raise ValueError(f"channel group {self.label} is not prunable ({self.reason})")
        channels = torch.as_tensor(channels)
        if channels.dtype == torch.bool and channels.numel() != self.size:
            raise ValueError(f"mask for group {self.label} has {channels.numel()} entries, group has {self.size}")
        for t in self.all_params(model):
            t[channels.to(t.device)] = 0


@dataclass(frozen=True)
class LayerChannels:
    """The groups a layer's input and output channels belong to (None: not channel-indexed)."""

    kind: str  # "conv", "depthwise", "linear", "bn"
    in_group: int | None
    out_group: int | None


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    layers: dict[str, LayerChannels]  # every conv, linear and BN, in graph order
    outputs: dict[str, int] = field(default_factory=dict)  # every called module -> group of its output channels

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, name: str) -> ChannelGroup:
        """The group whose channels a producer's output / a BN / a depthwise conv is indexed by."""
        lc = self.layers.get(name)
        if lc is None or lc.out_group is None:
            raise UsageError(f"{name!r} is not a conv, linear or BatchNorm layer of this model")
        return self.groups[lc.out_group]


def _weight_and_bias(layer: nn.Module) -> Iterator[torch.Tensor]:
    yield layer.weight
    if layer.bias is not None:
        yield layer.bias


def _channel_sq_norms(params: list[torch.Tensor], size: int) -> torch.Tensor:
    sq = torch.zeros(size)
    for t in params:
        sq += t.detach().float().reshape(size, -1).pow(2).sum(1).cpu()
    return sq


def zero_row_outputs_zero(layer: nn.Module) -> bool:
    """Whether an all-zero float weight row quantizes to an all-zero row (false for binary quantizers)."""
    wq = layer.weight_quant
    if not wq.is_quant_enabled:
        return True
    inj = wq.quant_injector
    return not ("quant_type" in inj and inj.quant_type == QuantType.BINARY)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[str] = []

    def new(self, size: int, fixed: str = "") -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        return ra

    def fix(self, i: int, reason: str) -> None:
        r = self.find(i)
        self.fixed[r] = self.fixed[r] or reason


@dataclass
class _Val:
    space: int
    gap: bool = False  # spatial extent is 1x1 (after a global pool): flatten keeps channel indices
    flat: bool = False  # a [N, C] tensor (after flatten or a linear layer): what a linear layer may read


def _unsupported(node: fx.Node, why: str) -> ChannelTraceError:
    return ChannelTraceError(f"channel tracing: node {node.name!r} ({node.op} {_target_name(node)}): {why}; "
                             "channel removal supports Brevitas conv/linear, BatchNorm2d, quant activations, "
                             "pooling, flatten after global pooling and residual adds")


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def trace_channels(model: nn.Module) -> ChannelGraph:
    """Trace `model` with torch.fx and return its channel groups and each layer's group membership."""
    gm = trace(model)
    uf = _UnionFind()
    vals: dict[fx.Node, _Val] = {}
    called: set[str] = set()
    # per layer: (kind, in space, out space); producers: (name, space, depthwise); BNs: (name, space, producer)
    layer_spaces: dict[str, tuple[str, int | None, int | None]] = {}
    producers: list[tuple[str, int, bool]] = []
    bns: list[tuple[str, int, str | None]] = []

    def val(node: fx.Node, arg: object) -> _Val:
        if not isinstance(arg, fx.Node) or arg not in vals:
            raise _unsupported(node, f"input {arg!r} is not a traced feature map")
        return vals[arg]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if vals:
                raise _unsupported(node, "models with more than one input are not supported")
            vals[node] = _Val(uf.new(-1, fixed="network input"))
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise _unsupported(node, "the model must return one tensor")
            uf.fix(val(node, out).space, "network output")
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            name = str(node.target)
            if len(node.args) != 1 or node.kwargs:
                raise _unsupported(node, "expected a module called on one tensor")
            x = val(node, node.args[0])
            if isinstance(mod, WEIGHT_TYPES) or isinstance(mod, nn.BatchNorm2d):
                if name in called:
                    raise _unsupported(node, "a layer called more than once (shared weights)")
                called.add(name)
            if isinstance(mod, qnn.QuantConv2d):
                _check_size(node, uf, x.space, mod.in_channels)
                if mod.groups == 1:
                    out = uf.new(mod.out_channels)
                    layer_spaces[name] = ("conv", x.space, out)
                    producers.append((name, out, False))
                    vals[node] = _Val(out)
                elif mod.groups == mod.in_channels == mod.out_channels:
                    layer_spaces[name] = ("depthwise", x.space, x.space)
                    producers.append((name, x.space, True))
                    vals[node] = _Val(x.space)
                else:
                    raise _unsupported(node, f"grouped conv (groups={mod.groups}) is not supported")
            elif isinstance(mod, qnn.QuantLinear):
                if not x.flat:
                    raise _unsupported(node, "linear layer on a feature map not flattened after global pooling")
                _check_size(node, uf, x.space, mod.in_features)
                out = uf.new(mod.out_features)
                layer_spaces[name] = ("linear", x.space, out)
                producers.append((name, out, False))
                vals[node] = _Val(out, flat=True)
            elif isinstance(mod, nn.BatchNorm2d):
                _check_size(node, uf, x.space, mod.num_features)
                src = node.args[0]
                owner = None
                if (src.op == "call_module" and isinstance(gm.get_submodule(src.target), qnn.QuantConv2d)
                        and len(src.users) == 1):
                    owner = str(src.target)
                layer_spaces[name] = ("bn", x.space, x.space)
                bns.append((name, x.space, owner))
                vals[node] = _Val(x.space, x.gap, x.flat)
            elif isinstance(mod, ACT_QUANT_TYPES):
                for pname, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                    if t.numel() > 1:
                        raise _unsupported(node, f"activation quantizer with a per-channel state ({pname})")
                vals[node] = _Val(x.space, x.gap, x.flat)
            elif isinstance(mod, Normalize):
                uf.fix(x.space, "network input")
                vals[node] = _Val(x.space, x.gap, x.flat)
            elif isinstance(mod, GLOBAL_POOLS):
                size = mod.output_size
                gap = size == 1 if isinstance(size, int) else tuple(size) == (1, 1)
                vals[node] = _Val(x.space, gap or x.gap)
            elif isinstance(mod, nn.Flatten):
                if mod.start_dim != 1 or not x.gap:
                    raise _unsupported(node, "flatten is supported only from dim 1 after global pooling")
                vals[node] = _Val(x.space, True, True)
            elif isinstance(mod, PASS_MODULES):
                vals[node] = _Val(x.space, x.gap, x.flat)
            else:
                raise _unsupported(node, f"unknown module type {type(mod).__name__}")
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if (node.op == "call_function" and target in ADD_FUNCTIONS) or (
                    node.op == "call_method" and target == "add"):
                args = list(node.args) + list(node.kwargs.values())
                if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
                    raise _unsupported(node, "only adds of two feature maps keep zero channels zero")
                a, b = val(node, args[0]), val(node, args[1])
                sa, sb = uf.size[uf.find(a.space)], uf.size[uf.find(b.space)]
                if sa != sb:
                    raise _unsupported(node, f"add of {sa} and {sb} channels (broadcasting)")
                if a.flat != b.flat:
                    raise _unsupported(node, "add of a flat and a spatial tensor")
                vals[node] = _Val(uf.union(a.space, b.space), a.gap and b.gap, a.flat)
            elif (node.op == "call_function" and target is torch.flatten) or (
                    node.op == "call_method" and target == "flatten"):
                x = val(node, node.args[0])
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                if start != 1 or end != -1 or not x.gap:
                    raise _unsupported(node, "flatten is supported only as flatten(x, 1) after global pooling")
                vals[node] = _Val(x.space, True, True)
            elif (node.op == "call_function" and target in PASS_FUNCTIONS) or (
                    node.op == "call_method" and target in PASS_METHODS):
                x = val(node, node.args[0])
                if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                    raise _unsupported(node, "a second feature-map input")
                vals[node] = _Val(x.space, x.gap, x.flat)
            else:
                raise _unsupported(node, "an op that may mix or rescale channels")
        elif node.op == "get_attr":
            raise _unsupported(node, "a tensor attribute used in the forward pass")
        else:  # pragma: no cover - fx has no other node kinds
            raise _unsupported(node, "unknown node kind")

    # Number the merged spaces in graph order (placeholder first) and build the groups.
    order: dict[int, int] = {}
    groups: list[ChannelGroup] = []

    def group_index(space: int | None) -> int | None:
        if space is None:
            return None
        root = uf.find(space)
        if root not in order:
            order[root] = len(groups)
            fixed = uf.fixed[root]
            groups.append(ChannelGroup(index=len(groups), size=uf.size[root], prunable=not fixed, reason=fixed))
        return order[root]

    outputs = {str(n.target): group_index(v.space) for n, v in vals.items() if n.op == "call_module"}
    layers: dict[str, LayerChannels] = {}
    for name, (kind, sin, sout) in layer_spaces.items():
        layers[name] = LayerChannels(kind, group_index(sin), group_index(sout))
    owned = {owner: name for name, _, owner in bns if owner is not None}
    for name, space, dw in producers:
        groups[group_index(space)].producers.append(Producer(name, owned.get(name), dw))
    for name, space, _ in bns:
        groups[group_index(space)].bns.append(name)
    for name, (kind, sin, _) in layer_spaces.items():
        if kind in ("conv", "linear"):
            groups[group_index(sin)].consumers.append(name)
    # The input space has size -1 until now (the image channel count is only known from its consumers).
    for g in groups:
        if g.size < 0:
            g.size = next((_in_size(model.get_submodule(c)) for c in g.consumers), 0)
    return ChannelGraph(groups, layers, outputs)


def _in_size(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, qnn.QuantConv2d) else layer.in_features


def _check_size(node: fx.Node, uf: _UnionFind, space: int, expected: int) -> None:
    root = uf.find(space)
    if uf.size[root] < 0:  # the network input: its channel count is whatever the first layer reads
        uf.size[root] = expected
    elif uf.size[root] != expected:
        raise _unsupported(node, f"expects {expected} channels, its input has {uf.size[root]}")


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """All channel groups of `model` (prunable or not), in graph order."""
    return trace_channels(model).groups


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
