"""QuantSpec: which bit widths a model's layers use, and the layer constructors models build from."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import brevitas.nn as qnn
import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.quant.presets import FLOAT, SIGNED_ACT_QUANT, UNSIGNED_ACT_QUANT, WEIGHT_QUANT, parse_bits


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths for a model. `bits` are weight bits (32 = float); activations use `act_bits`.

    First and last layers keep `first_last_bits` (8 by default, the usual practice in low-bit
    papers) unless None; `overrides` maps fnmatch patterns of module names to weight bits and wins
    over both.
    """

    bits: int = 8
    act_bits: int = 8
    first_last_bits: int | None = 8
    overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", parse_bits(self.bits))
        object.__setattr__(self, "act_bits", parse_bits(self.act_bits, what="activation",
                                                        table=UNSIGNED_ACT_QUANT))
        if self.first_last_bits is not None:
            object.__setattr__(self, "first_last_bits", parse_bits(self.first_last_bits))
        object.__setattr__(self, "overrides", {k: parse_bits(v) for k, v in dict(self.overrides).items()})

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT and self.act_bits == FLOAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(**d)

    # -- layer constructors: every model is built from these --------------------------------
    def conv(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int | None = None,
             groups: int = 1, bias: bool = False, bits: int | None = None) -> qnn.QuantConv2d:
        padding = kernel // 2 if padding is None else padding
        return qnn.QuantConv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups,
                               bias=bias, weight_quant=WEIGHT_QUANT[self.bits if bits is None else bits])

    def linear(self, in_f: int, out_f: int, bias: bool = True, bits: int | None = None) -> qnn.QuantLinear:
        return qnn.QuantLinear(in_f, out_f, bias=bias, weight_quant=WEIGHT_QUANT[self.bits if bits is None else bits])

    def relu(self) -> qnn.QuantReLU:
        """ReLU whose output is quantized unsigned (uint8, zero point 0 in the exported graph)."""
        return qnn.QuantReLU(act_quant=UNSIGNED_ACT_QUANT[self.act_bits])

    def act_signed(self) -> qnn.QuantIdentity:
        """Quantize a signed activation (residual branch ends, the normalized input)."""
        return qnn.QuantIdentity(act_quant=SIGNED_ACT_QUANT[self.act_bits])

    def act_unsigned(self) -> qnn.QuantIdentity:
        """Re-quantize a non-negative activation (e.g. after global average pooling)."""
        return qnn.QuantIdentity(act_quant=UNSIGNED_ACT_QUANT[self.act_bits])


WEIGHT_LAYERS = (qnn.QuantConv2d, qnn.QuantLinear)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def layer_bits(module: nn.Module) -> int:
    """Weight bits a Brevitas layer quantizes to (32 when float)."""
    if not module.weight_quant.is_quant_enabled:
        return FLOAT
    return int(module.weight_quant.bit_width())


def rebuild_with_bits(module: nn.Module, bits: int) -> nn.Module:
    """Same-shaped Brevitas layer with another weight quantizer; float weights and bias copied."""
    wq = WEIGHT_QUANT[bits]
    if isinstance(module, qnn.QuantConv2d):
        new = qnn.QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                              padding=module.padding, dilation=module.dilation, groups=module.groups,
                              bias=module.bias is not None, weight_quant=wq)
    elif isinstance(module, qnn.QuantLinear):
        new = qnn.QuantLinear(module.in_features, module.out_features, bias=module.bias is not None,
                              weight_quant=wq)
    else:
        raise TypeError(f"not a Brevitas weight layer: {type(module).__name__}")
    with torch.no_grad():
        new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.to(module.weight.device)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def first_last_names(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
    """The layers a first/last bit policy keeps wide: the model's own `first_last_layers` when it names them (an
    ensemble: every member's stem and classifier), else the first and last weight layers."""
    own = [n for n in getattr(model, "first_last_layers", None) or [] if n in dict(layers)]
    return own or [layers[0][0], layers[-1][0]]


def apply_bit_policy(model: nn.Module, spec: QuantSpec) -> dict[str, int]:
    """Apply first/last-layer bits and per-layer overrides; returns the bits of every weight layer."""
    layers = weight_layers(model)
    wanted: dict[str, int] = {name: spec.bits for name, _ in layers}
    if spec.first_last_bits is not None and spec.bits != FLOAT and layers:
        for name in first_last_names(model, layers):
            wanted[name] = spec.first_last_bits
    for pattern, bits in spec.overrides.items():
        hits = [name for name in wanted if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise UsageError(f"bit override {pattern!r} matches no layer; layers: {', '.join(wanted)}")
        for name in hits:
            wanted[name] = bits
    for name, module in layers:
        if layer_bits(module) != wanted[name]:
            set_module(model, name, rebuild_with_bits(module, wanted[name]))
    return wanted
