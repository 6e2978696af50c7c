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
(naming the node) instead of mis-pruning it. What each layer type does to channels is its rule in
`rcdeploy.models.layer_rules`, the same rule shrink slices with and the integer export writes with.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from brevitas.inject.enum import QuantType
from torch import fx, nn

from rcdeploy.errors import UsageError
from rcdeploy.models.layer_rules import ChannelFlow, LayerRule, rule_for
from rcdeploy.models.trace import trace

# Functions and tensor methods that map 0 to 0 per channel: they pass a channel space through.
# (Modules are handled by their rule in `rcdeploy.models.layer_rules`.)
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
        return [t for layer in self.function_layers(model) for t in layer]

    def function_layers(self, model: nn.Module) -> list[list[torch.Tensor]]:
        """`function_params` split by layer: each producer without a BN of its own (weight, bias) and each
        BN (gamma, beta), in that order."""
        out: list[list[torch.Tensor]] = []
        for p in self.producers:
            if p.bn is None:
                out.append(list(_weight_and_bias(model.get_submodule(p.name))))
        for name in self.bns:
            bn = model.get_submodule(name)
            layer = [t for t in (bn.weight, bn.bias) if t is not None]
            if layer:
                out.append(layer)
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
    def zero_inputs_(self, model: nn.Module, channels: torch.Tensor) -> None:
        """Zero the consumers' input columns of channels (bool mask): they multiply zeros once the channels
        are pruned, so nothing changes, but a low-rank projection then sees the layer's true shape."""
        for name in self.consumers:
            w = model.get_submodule(name).weight
            if w.shape[1] == self.size:  # a conv or linear reading exactly this group's channels
                w[:, channels.to(w.device)] = 0

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


def _unsupported(node: fx.Node, why: str) -> ChannelTraceError:
    return ChannelTraceError(f"channel tracing: node {node.name!r} ({node.op} {_target_name(node)}): {why}; "
                             "channel removal supports Brevitas conv/linear, BatchNorm2d, quant activations, "
                             "pooling, flatten after global pooling and residual adds")


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _is_call(node: fx.Node, functions: tuple, methods: tuple[str, ...]) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods)


class _Tracer:
    """One walk over the fx graph: a channel space per feature map, merged by adds (union-find); modules
    are handled by their layer rule (`rcdeploy.models.layer_rules`), the few functions here."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.flows: dict[fx.Node, ChannelFlow] = {}
        self.called: set[str] = set()
        # per layer: (kind, in space, out space); producers: (name, space, depthwise); BNs: (name, space, producer)
        self.layer_spaces: dict[str, tuple[str, int, int]] = {}
        self.producers: list[tuple[str, int, bool]] = []
        self.bns: list[tuple[str, int, str | None]] = []

    def walk(self) -> None:
        handlers = {"placeholder": self.placeholder, "output": self.output, "call_module": self.module,
                    "call_function": self.function, "call_method": self.function, "get_attr": self.get_attr}
        for node in self.gm.graph.nodes:
            handler = handlers.get(node.op)
            if handler is None:  # pragma: no cover - fx has no other node kinds
                raise _unsupported(node, "unknown node kind")
            handler(node)

    # -- what a layer rule may do (the `ChannelTrace` protocol) ---------------------------------------
    def refuse(self, node: fx.Node, why: str) -> ChannelTraceError:
        return _unsupported(node, why)

    def check_size(self, node: fx.Node, space: int, expected: int) -> None:
        root = self.uf.find(space)
        if self.uf.size[root] < 0:  # the network input: its channel count is whatever the first layer reads
            self.uf.size[root] = expected
        elif self.uf.size[root] != expected:
            raise _unsupported(node, f"expects {expected} channels, its input has {self.uf.size[root]}")

    def new_space(self, size: int) -> int:
        return self.uf.new(size)

    def fix(self, space: int, reason: str) -> None:
        self.uf.fix(space, reason)

    def module_of(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def add_layer(self, name: str, kind: str, in_space: int, out_space: int) -> None:
        self.layer_spaces[name] = (kind, in_space, out_space)

    def add_producer(self, name: str, space: int, depthwise: bool) -> None:
        self.producers.append((name, space, depthwise))

    def add_bn(self, name: str, space: int, owner: str | None) -> None:
        self.bns.append((name, space, owner))

    # -- node kinds ------------------------------------------------------------------------------------
    def flow(self, node: fx.Node, arg: object) -> ChannelFlow:
        if not isinstance(arg, fx.Node) or arg not in self.flows:
            raise _unsupported(node, f"input {arg!r} is not a traced feature map")
        return self.flows[arg]

    def placeholder(self, node: fx.Node) -> None:
        if self.flows:
            raise _unsupported(node, "models with more than one input are not supported")
        self.flows[node] = ChannelFlow(self.uf.new(-1, fixed="network input"))

    def output(self, node: fx.Node) -> None:
        out = node.args[0]
        if not isinstance(out, fx.Node):
            raise _unsupported(node, "the model must return one tensor")
        self.uf.fix(self.flow(node, out).space, "network output")

    def get_attr(self, node: fx.Node) -> None:
        raise _unsupported(node, "a tensor attribute used in the forward pass")

    def module(self, node: fx.Node) -> None:
        mod = self.gm.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(node, "expected a module called on one tensor")
        x = self.flow(node, node.args[0])
        rule = rule_for(mod) or LayerRule()  # the base rule refuses, naming the type
        if rule.indexed:
            if str(node.target) in self.called:
                raise _unsupported(node, "a layer called more than once (shared weights)")
            self.called.add(str(node.target))
        self.flows[node] = rule.channels(self, node, mod, x)

    def function(self, node: fx.Node) -> None:
        if _is_call(node, ADD_FUNCTIONS, ("add",)):
            self.flows[node] = self.add(node)
        elif _is_call(node, (torch.flatten,), ("flatten",)):
            self.flows[node] = self.flatten(node)
        elif _is_call(node, PASS_FUNCTIONS, PASS_METHODS):
            x = self.flow(node, node.args[0])
            if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                raise _unsupported(node, "a second feature-map input")
            self.flows[node] = x
        else:
            raise _unsupported(node, "an op that may mix or rescale channels")

    def add(self, node: fx.Node) -> ChannelFlow:
        """A residual add: both inputs carry the same channels, so their spaces merge."""
        args = list(node.args) + list(node.kwargs.values())
        if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
            raise _unsupported(node, "only adds of two feature maps keep zero channels zero")
        a, b = self.flow(node, args[0]), self.flow(node, args[1])
        sa, sb = self.uf.size[self.uf.find(a.space)], self.uf.size[self.uf.find(b.space)]
        if sa != sb:
            raise _unsupported(node, f"add of {sa} and {sb} channels (broadcasting)")
        if a.flat != b.flat:
            raise _unsupported(node, "add of a flat and a spatial tensor")
        return ChannelFlow(self.uf.union(a.space, b.space), a.gap and b.gap, a.flat)

    def flatten(self, node: fx.Node) -> ChannelFlow:
        x = self.flow(node, node.args[0])
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if start != 1 or end != -1 or not x.gap:
            raise _unsupported(node, "flatten is supported only as flatten(x, 1) after global pooling")
        return ChannelFlow(x.space, True, True)

    # -- the result ------------------------------------------------------------------------------------
    def graph(self, model: nn.Module) -> ChannelGraph:
        """Number the merged spaces in graph order (placeholder first) and build the groups."""
        numbering = _GroupNumbering(self.uf)
        outputs = {str(n.target): numbering.index(f.space) for n, f in self.flows.items() if n.op == "call_module"}
        layers = {name: LayerChannels(kind, numbering.index(sin), numbering.index(sout))
                  for name, (kind, sin, sout) in self.layer_spaces.items()}
        groups = numbering.groups
        owned = {owner: name for name, _, owner in self.bns if owner is not None}
        for name, space, dw in self.producers:
            groups[numbering.index(space)].producers.append(Producer(name, owned.get(name), dw))
        for name, space, _ in self.bns:
            groups[numbering.index(space)].bns.append(name)
        for name, (kind, sin, _) in self.layer_spaces.items():
            if kind in ("conv", "linear"):
                groups[numbering.index(sin)].consumers.append(name)
        _size_input_groups(model, groups)
        return ChannelGraph(groups, layers, outputs)


class _GroupNumbering:
    """Channel groups numbered by first sight of their merged space."""

    def __init__(self, uf: _UnionFind) -> None:
        self.uf = uf
        self.order: dict[int, int] = {}
        self.groups: list[ChannelGroup] = []

    def index(self, space: int) -> int:
        root = self.uf.find(space)
        if root not in self.order:
            self.order[root] = len(self.groups)
            fixed = self.uf.fixed[root]
            self.groups.append(ChannelGroup(index=len(self.groups), size=self.uf.size[root], prunable=not fixed,
                                            reason=fixed))
        return self.order[root]


def _size_input_groups(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """The input space has size -1 until now (the image channel count is only known from its consumers)."""
    for g in groups:
        if g.size < 0:
            g.size = next((_in_size(model.get_submodule(c)) for c in g.consumers), 0)


def _in_size(layer: nn.Module) -> int:
    rule = rule_for(layer)
    assert rule is not None  # a consumer was traced through its rule
    return rule.widths(layer)[0]


def trace_channels(model: nn.Module) -> ChannelGraph:
    """Trace `model` with torch.fx and return its channel groups and each layer's group membership."""
    tracer = _Tracer(trace(model))
    tracer.walk()
    return tracer.graph(model)


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
