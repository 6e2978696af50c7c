"""Physical channel removal: a dense, smaller model that computes exactly what the masked one did.

Reads which channels are removable from the one dependency tracer (`rcdeploy.models.channels`), then
replaces every conv, linear and BatchNorm with a sliced copy made by its layer rule
(`rcdeploy.models.layer_rules`): a new Brevitas layer built from the same quantizer injectors, loaded
with the sliced state dict. Per-output-channel weight scales are *sliced*,
never recomputed, and activation quantizers are untouched (per-tensor), so every quantizer keeps its
scale and the smaller model's outputs equal the masked model's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from rich.table import Table
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.models.channels import ChannelGraph, ChannelGroup, trace_channels, unwrap
from rcdeploy.models.layer_rules import LayerRule, rule_for
from rcdeploy.quant.calibrate import init_weight_scales
from rcdeploy.quant.spec import set_module


@dataclass
class LayerShrink:
    """One conv / linear / BatchNorm layer before and after removal. MACs per image (None for BN, which
    export folds or runs as a per-channel affine op, or when no input shape was given)."""

    name: str
    kind: str  # conv, depthwise, linear, bn
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None


@dataclass
class ShrinkReport:
    layers: list[LayerShrink] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    channel_multiple: int = 1
    channels_before: int = 0  # prunable channels (each coupled group counted once)
    channels_after: int = 0
    all_params_before: int = 0  # every parameter of the model, quantizer scales included
    all_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Weights and biases of convs, linears and BNs."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def macs_before(self) -> int | None:
        return None if self.input_shape is None else sum(r.macs_before or 0 for r in self.layers)

    @property
    def macs_after(self) -> int | None:
        return None if self.input_shape is None else sum(r.macs_after or 0 for r in self.layers)

    def totals(self) -> dict[str, int | None]:
        return {"channels_before": self.channels_before, "channels_after": self.channels_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "all_params_before": self.all_params_before, "all_params_after": self.all_params_after}

    def to_dict(self) -> dict:
        return {"input_shape": None if self.input_shape is None else list(self.input_shape),
                "channel_multiple": self.channel_multiple, "totals": self.totals(),
                "layers": [asdict(r) for r in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ShrinkReport:
        """Inverse of `to_dict` (export summaries and sidecars carry the dict form)."""
        t = d.get("totals", {})
        return cls(layers=[LayerShrink(**r) for r in d.get("layers", [])],
                   input_shape=None if d.get("input_shape") is None else tuple(d["input_shape"]),
                   channel_multiple=d.get("channel_multiple", 1), channels_before=t.get("channels_before", 0),
                   channels_after=t.get("channels_after", 0), all_params_before=t.get("all_params_before", 0),
                   all_params_after=t.get("all_params_after", 0))

    def to_table(self) -> Table:
        table = Table(title="channel removal", show_footer=True)

        def ratio(a: int | None, b: int | None) -> str:
            return "-" if a is None or b is None else f"{a:,} -> {b:,}"

        table.add_column("layer", footer="total")
        table.add_column("kind")
        table.add_column("in", justify="right")
        table.add_column("out", justify="right",
                         footer=f"{self.channels_before} -> {self.channels_after} ch")
        table.add_column("params", justify="right", footer=ratio(self.params_before, self.params_after))
        table.add_column("MACs", justify="right", footer=ratio(self.macs_before, self.macs_after))
        for r in self.layers:
            table.add_row(r.name, r.kind, f"{r.in_before}->{r.in_after}", f"{r.out_before}->{r.out_after}",
                          ratio(r.params_before, r.params_after), ratio(r.macs_before, r.macs_after))
        return table

    def __rich__(self) -> Table:
        return self.to_table()


def keep_indices(model: nn.Module, group: ChannelGroup, channel_multiple: int = 1) -> torch.Tensor:
    """Sorted channel indices to keep: every alive channel, topped up to a multiple of `channel_multiple`
    (and to at least one) with dead channels. Dead channels compute exactly 0, so which ones are kept
    does not change outputs; those with the largest consumer and producer weights are kept, so a later
    fine-tune starts from the most connected ones."""
    if channel_multiple < 1:
        raise UsageError(f"channel multiple must be >= 1, got {channel_multiple}")
    alive = group.alive(model)
    n = int(alive.sum())
    want = min(group.size, max(1, math.ceil(n / channel_multiple) * channel_multiple))
    if want > n:
        score = group.consumer_norms(model) ** 2 + group.norms(model, function_only=False) ** 2
        score[alive] = float("inf")
        keep = torch.topk(score, want).indices
    else:
        keep = alive.nonzero().flatten()
    return keep.sort().values


@torch.no_grad()
def zero_channels(model: nn.Module, masks: Mapping[str | int, torch.Tensor | Sequence[int]],
                  graph: ChannelGraph | None = None) -> ChannelGraph:
    """Zero channels the removable way: rows of every producer and gamma/beta of every BN of their group.

    `masks` maps a group index, or the name of any conv / BN / linear writing the group, to channels
    (a bool mask or indices) of that group. Returns the channel graph used.
    """
    model = unwrap(model)
    graph = graph or trace_channels(model)
    for key, channels in masks.items():
        if isinstance(key, int):
            if not 0 <= key < len(graph.groups):
                raise UsageError(f"channel group {key} does not exist; the model has {len(graph.groups)}")
            group = graph.groups[key]
        else:
            group = graph.group_of(key)
        if not group.prunable:
            raise UsageError(f"channels of {key!r} cannot be removed ({group.reason})")
        group.zero_(model, torch.as_tensor(channels))
    return graph


def _rule(layer: nn.Module) -> LayerRule:
    rule = rule_for(layer)
    assert rule is not None and rule.indexed, type(layer)  # graph.layers holds only traced indexed layers
    return rule


def _layer_params(layer: nn.Module) -> int:
    return sum(t.numel() for t in (layer.weight, layer.bias) if t is not None)


def _noise_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Noise-injection modules that take their scale from the statistics of their input (EnResNet's)."""
    return {n: m for n, m in model.named_modules()
            if type(m).__name__.endswith("Noise") and hasattr(m, "stat_channels")}


@torch.no_grad()
def _output_sizes(model: nn.Module, names: list[str], input_shape: Sequence[int],
                  noise_channels: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """Spatial size of each conv's output for one image of `input_shape` (C, H, W); eval mode, no state change.
    With `noise_channels`, also fills in the input channel count of every noise module."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name in names:
        layer = model.get_submodule(name)
        if _rule(layer).macs_need_out_hw:
            def hook(_m, _i, out, name=name):
                sizes[name] = tuple(out.shape[-2:])
            hooks.append(layer.register_forward_hook(hook))
    if noise_channels is not None:
        for name, m in _noise_modules(model).items():
            def pre_hook(_m, inputs, name=name):
                noise_channels[name] = int(inputs[0].shape[1])
            hooks.append(m.register_forward_pre_hook(pre_hook))
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def shrink_model(model: nn.Module, *, channel_multiple: int = 1,
                 input_shape: Sequence[int] | None = None) -> tuple[nn.Module, ShrinkReport]:
    """A dense copy of `model` without its removable channels, and a per-layer report.

    The copy computes the same outputs (float: equal up to summation order; quantized: every quantizer
    keeps its scale). `channel_multiple` rounds each group's kept count up to a multiple (int8 kernels
    can run slower on odd counts); `input_shape` (C, H, W) enables the MACs columns and lets noise modules
    (EnResNet) keep the std of their unshrunk input (`stat_channels`). `model` is unchanged.
    """
    src = copy.deepcopy(unwrap(model))
    # A learned weight scale not yet initialized would later be computed from the *sliced* weights;
    # initialize it now from the full ones, as the masked model's first forward would.
    init_weight_scales(src)
    graph = trace_channels(src)
    keeps = [keep_indices(src, g, channel_multiple) if g.prunable else torch.arange(g.size) for g in graph.groups]
    noise_channels: dict[str, int] = {}
    sizes = _output_sizes(src, list(graph.layers), input_shape, noise_channels) if input_shape is not None else {}
    report = ShrinkReport(input_shape=None if input_shape is None else tuple(int(s) for s in input_shape),
                          channel_multiple=channel_multiple,
                          channels_before=sum(g.size for g in graph.prunable()),
                          channels_after=sum(len(keeps[g.index]) for g in graph.prunable()),
                          all_params_before=sum(p.numel() for p in src.parameters()))
    for name, lc in graph.layers.items():
        layer = src.get_submodule(name)
        keep_out = keeps[lc.out_group]
        keep_in = keeps[lc.in_group] if lc.in_group is not None else keep_out
        new = _rule(layer).slice(layer, keep_in, keep_out)
        set_module(src, name, new)
        report.layers.append(_layer_report(name, lc.kind, layer, new, sizes.get(name), input_shape is not None))
    # Noise modules keep the std of the unshrunk tensor (removed channels count as zeros); without an
    # input shape their channel counts are unknown and the std is taken over the kept channels only.
    for name, channels in noise_channels.items():
        m = src.get_submodule(name)
        if m.stat_channels is None:
            m.stat_channels = channels
    report.all_params_after = sum(p.numel() for p in src.parameters())
    return src, report


def _layer_report(name: str, kind: str, before: nn.Module, after: nn.Module, out_hw: tuple[int, int] | None,
                  with_macs: bool) -> LayerShrink:
    rule = _rule(before)
    (in_before, out_before), (in_after, out_after) = rule.widths(before), rule.widths(after)
    return LayerShrink(name=name, kind=kind, in_before=in_before, in_after=in_after, out_before=out_before,
                       out_after=out_after, params_before=_layer_params(before), params_after=_layer_params(after),
                       macs_before=rule.macs(before, out_hw) if with_macs else None,
                       macs_after=rule.macs(after, out_hw) if with_macs else None)
