"""Bit-width presets -> Brevitas quantizers, declared (Brevitas style: a preset overrides one attribute).

Weights: signed, narrow range, per-output-channel scale learned from a max-abs init
(PARAMETER_FROM_STATS). Per-channel scales make BatchNorm folding exact at export, and a *stored*
scale stays put when physical channel removal drops input channels of a layer (a max-abs statistic
would be recomputed and could change). 2 bits in narrow range is ternary {-1, 0, 1}; 1 bit is binary.
Activations: per-tensor learned scale; unsigned after ReLU, signed elsewhere. 8-bit activations map
onto uint8 with zero point 0 (unsigned) or 128 (signed) in the exported graph (U8S8, the form x86
integer kernels run fastest).
"""

from __future__ import annotations

from brevitas.inject.enum import QuantType, ScalingImplType, StatsOp
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

from rcdeploy.errors import UsageError

FLOAT = 32  # "bits" value meaning: no quantization
# Activation stats are collected for this many calibration batches before training starts.
ACT_CALIBRATION_STEPS = 16


class IntWeightPerChannelLearned(Int8WeightPerChannelFloat):
    """Narrow-range signed int weights, per-output-channel learned scale (init: max |w| per channel)."""

    scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS


class Int8Weight(IntWeightPerChannelLearned):
    bit_width = 8


class Int7Weight(IntWeightPerChannelLearned):
    """7 bits: |w| <= 63, so every u8 x s8 pair sum stays within int16 on x86 without VNNI (see
    rcdeploy.runtime.u8s8) and 8-bit-class layers keep int8 kernels in every runtime."""

    bit_width = 7


class Int6Weight(IntWeightPerChannelLearned):
    bit_width = 6


class Int5Weight(IntWeightPerChannelLearned):
    bit_width = 5


class Int4Weight(IntWeightPerChannelLearned):
    bit_width = 4


class Int3Weight(IntWeightPerChannelLearned):
    bit_width = 3


class TernaryWeight(IntWeightPerChannelLearned):
    """2-bit narrow range: {-1, 0, +1} * per-channel scale."""

    bit_width = 2


class BinaryWeight(IntWeightPerChannelLearned):
    """{-1, +1} * per-channel scale, scale initialised to mean |w| (the XNOR-Net optimum)."""

    quant_type = QuantType.BINARY
    bit_width = 1
    narrow_range = False
    scaling_stats_op = StatsOp.AVE


class Uint8Act(Uint8ActPerTensorFloat):
    collect_stats_steps = ACT_CALIBRATION_STEPS


class Uint4Act(Uint8Act):
    bit_width = 4


class Int8Act(Int8ActPerTensorFloat):
    collect_stats_steps = ACT_CALIBRATION_STEPS


class Int4Act(Int8Act):
    bit_width = 4


WEIGHT_QUANT = {8: Int8Weight, 7: Int7Weight, 6: Int6Weight, 5: Int5Weight, 4: Int4Weight, 3: Int3Weight,
                2: TernaryWeight, 1: BinaryWeight, FLOAT: None}
UNSIGNED_ACT_QUANT = {8: Uint8Act, 4: Uint4Act, FLOAT: None}
SIGNED_ACT_QUANT = {8: Int8Act, 4: Int4Act, FLOAT: None}

_BIT_NAMES = {"float": FLOAT, "fp32": FLOAT, "32": FLOAT, "ternary": 2, "binary": 1}


def parse_bits(value: str | int, *, what: str = "weight", table: dict | None = None) -> int:
    """'8', 4, 'float', 'ternary', 'binary' -> int bits (32 = float); unsupported -> UsageError."""
    table = WEIGHT_QUANT if table is None else table
    key = str(value).strip().lower()
    bits = _BIT_NAMES.get(key)
    if bits is None:
        try:
            bits = int(key)
        except ValueError:
            bits = None
    if bits not in table:
        names = ", ".join(("float" if b == FLOAT else str(b)) for b in sorted(table, reverse=True))
        raise UsageError(f"{what} bits {value!r} not supported; choose one of: {names} (2 = ternary, 1 = binary)")
    return bits


def bits_name(bits: int) -> str:
    return {FLOAT: "float", 2: "ternary(2)", 1: "binary(1)"}.get(bits, f"int{bits}")
