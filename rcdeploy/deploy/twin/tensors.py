"""Tensor carriers and (de)quantization arithmetic shared by every op family.

Integer tensors travel as float tensors that hold integer values (float64 for 32-bit ints, where
every value is exact), so gradients flow through them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from rcdeploy.errors import UsageError

# Integer ranges of the element types a QuantizeLinear / QLinear* output may have.
_QRANGE: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT4: (-8, 7),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_INTS = {
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT32,
    TensorProto.UINT32,
    TensorProto.INT64,
    TensorProto.UINT64,
    TensorProto.INT4,
    TensorProto.UINT4,
}


class _RoundSTE(torch.autograd.Function):
    """Round half to even forward (exact, as onnxruntime), identity backward."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _TruncSTE(torch.autograd.Function):
    """Truncation toward zero forward (ONNX float -> int Cast), identity backward."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        return torch.trunc(v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


# ----------------------------------------------------------------------------------- conversions


def _tensor_from_proto(t: onnx.TensorProto) -> tuple[torch.Tensor, int]:
    """A torch constant for an ONNX tensor, in the twin's carrier dtype, and its ONNX type."""
    if t.data_type == TensorProto.STRING:
        raise UsageError(f"string tensor {t.name!r} is not supported by the twin")
    arr = numpy_helper.to_array(t)
    return _carrier(arr, t.data_type), t.data_type


def _carrier(arr: np.ndarray, onnx_type: int) -> torch.Tensor:
    # float types -> float32 (the twin computes in float32); <= 16-bit ints -> float32 (exact);
    # 32-bit ints -> float64 (exact); 64-bit ints -> int64 (shapes, axes, indices); bool -> bool.
    if onnx_type in _FLOATS:
        return torch.from_numpy(np.array(arr, dtype=np.float32))
    if onnx_type == TensorProto.BOOL:
        return torch.from_numpy(np.array(arr, dtype=bool))
    if onnx_type in (TensorProto.INT64, TensorProto.UINT64):
        return torch.from_numpy(np.array(arr, dtype=np.int64))
    if onnx_type in (TensorProto.INT32, TensorProto.UINT32):
        return torch.from_numpy(np.array(arr, dtype=np.float64))
    if onnx_type in _INTS:
        return torch.from_numpy(np.ascontiguousarray(arr.astype(np.int32), dtype=np.float32))
    raise UsageError(
        f"tensor element type {helper.tensor_dtype_to_string(onnx_type)} is not supported by the twin"
    )


def _num(t: torch.Tensor) -> torch.Tensor:
    """Integer (shape) tensors as float64 for arithmetic with scales."""
    return t if t.is_floating_point() else t.to(torch.float64)


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis_param(
    p: torch.Tensor, ref_rank: int, axis: int, ref_shape: Sequence[int], block: int = 0
) -> torch.Tensor:
    """Broadcast a per-tensor, per-axis or blocked scale / zero point against a tensor."""
    if p.dim() == 0 or (p.numel() == 1 and not block):
        return p.reshape(())
    axis %= ref_rank
    if block:
        # Blocked quantization: p has the tensor's rank, with ceil(D / block) entries on `axis`.
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, ref_shape[axis])
    shape = [1] * ref_rank
    shape[axis] = p.numel()
    return p.reshape(shape)


def _quantize(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | float, qtype: int, rounding: bool | str
) -> torch.Tensor:
    """saturate(round(x / scale) + zp). rounding: "exact" (or False), "ste" (or True: round forward,
    identity backward) or "smooth" (no rounding at all: the surrogate's smooth forward)."""
    lo, hi = _QRANGE[qtype]
    v = x / scale
    if rounding == "smooth":
        r = v
    else:
        r = _RoundSTE.apply(v) if rounding in (True, "ste") else torch.round(v)
    # clamp's gradient is 1 inside [lo, hi] and 0 outside: the STE's saturation rule.
    q = torch.clamp(r + zp, lo, hi)
    # int32 results need float64 to stay exact; every narrower type is exact in float32.
    return q.to(torch.float64 if qtype == TensorProto.INT32 else torch.float32)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | float) -> torch.Tensor:
    return ((_num(q) - zp) * scale).to(torch.float32)
