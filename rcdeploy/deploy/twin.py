"""A differentiable twin of an ONNX classifier: a torch interpreter of the graph onnxruntime runs.

Robust accuracy is measured on the file that ships (DESIGN.md): adversarial images are made with
gradients of this twin, rebuilt from the ONNX graph itself, then scored by onnxruntime. The twin
computes what onnxruntime computes, node by node:

- QuantizeLinear is saturate(round_half_to_even(x / scale) + zero_point); with `ste=True` the
  rounding passes gradients straight through (1 inside the representable range, 0 where the
  value saturates), with `ste=False` it is plain rounding and the gradient is zero, as a
  literal reading of the integer graph would give.
- DequantizeLinear is (q - zero_point) * scale, per-tensor, per-axis or blocked.
- Integer tensors travel as float tensors that hold integer values, so gradients flow through
  them; int32 constants (biases) are kept in float64, where every int32 is exact.
- The QOperator forms onnxruntime's quantizer writes (QLinearConv, QGemm, QLinearAdd, ...) are
  computed as dequantize -> float op -> quantize, which is what their integer kernels compute
  up to float rounding of the requantization scale.
- `isa="avx2"` adds what x86 CPUs without VNNI compute differently: the int16 saturation of
  neighbouring u8 x s8 product pairs (`rcdeploy.runtime.u8s8`), in every kernel onnxruntime runs
  that way: QOperator nodes directly, QDQ nodes where onnxruntime's optimized graph fuses them into
  such a kernel. The saturation error is added as a constant for the gradient (the gradient is the
  exact op's). The default is what this CPU does, so the twin matches onnxruntime here.

Why not onnx2torch: version 1.5.15 (checked by installing it into a scratch directory) converts
none of QuantizeLinear, DequantizeLinear, QLinearConv, QLinearMatMul, MatMulInteger,
ConvInteger, the com.microsoft QLinear*/QGemm ops or RandomNormalLike, and has no notion of a
straight-through estimator: the quantized graphs this twin exists for would not convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.runtime import u8s8
from rcdeploy.runtime.cpu import resolve_isa
from rcdeploy.runtime.session import load_model_proto

__all__ = ["OnnxTwin", "build_twin", "supported_ops"]

_STD = ""
_MS = "com.microsoft"

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
# Ops whose output is not a function of their inputs: never folded into constants.
_NO_FOLD = {"RandomNormalLike", "RandomUniformLike"}


@dataclass
class _Node:
    name: str
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.op} node {self.name!r}" if self.name else f"{self.op} node"


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
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | float, qtype: int, ste: bool
) -> torch.Tensor:
    lo, hi = _QRANGE[qtype]
    v = x / scale
    r = _RoundSTE.apply(v) if ste else torch.round(v)
    # clamp's gradient is 1 inside [lo, hi] and 0 outside: the STE's saturation rule.
    q = torch.clamp(r + zp, lo, hi)
    # int32 results need float64 to stay exact; every narrower type is exact in float32.
    return q.to(torch.float64 if qtype == TensorProto.INT32 else torch.float32)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | float) -> torch.Tensor:
    return ((_num(q) - zp) * scale).to(torch.float32)


# ----------------------------------------------------------------------------------- op registry

_Op = Callable[["OnnxTwin", _Node, list], Any]
_OPS: dict[tuple[str, str], _Op] = {}


def _op(*names: str, domain: str = _STD) -> Callable[[_Op], _Op]:
    def add(fn: _Op) -> _Op:
        for n in names:
            _OPS[(domain, n)] = fn
        return fn

    return add


def supported_ops() -> list[str]:
    """Names of the ONNX ops the twin interprets (`domain:Op` outside the default domain)."""
    return sorted(f"{d}:{o}" if d else o for d, o in _OPS)


def _arg(ins: list, i: int) -> torch.Tensor | None:
    return ins[i] if i < len(ins) else None


def _qtype(tw: OnnxTwin, node: _Node, zp_index: int) -> int:
    """Element type of a quantized tensor: its zero point's type, else `output_dtype`, else uint8."""
    name = node.inputs[zp_index] if zp_index < len(node.inputs) else ""
    if name:
        t = tw._types.get(name)
        if t is None:
            raise UsageError(
                f"{node.where()}: zero point {name!r} is not a constant; the twin needs its type"
            )
        if t not in _QRANGE:
            raise UsageError(
                f"{node.where()}: quantized type {helper.tensor_dtype_to_string(t)} is not supported"
            )
        return t
    t = int(node.attrs.get("output_dtype", 0)) or TensorProto.UINT8
    if t not in _QRANGE:
        raise UsageError(
            f"{node.where()}: quantized type {helper.tensor_dtype_to_string(t)} is not supported"
        )
    return t


# --- quantization -------------------------------------------------------------------------------


@_op("QuantizeLinear")
def _quantize_linear(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, s, zp = ins[0], ins[1], _arg(ins, 2)
    axis, block = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0))
    s = _axis_param(s, x.dim(), axis, x.shape, block)
    zp = 0.0 if zp is None else _axis_param(zp, x.dim(), axis, x.shape, block)
    return _quantize(x.float(), s, zp, _qtype(tw, node, 2), tw.ste)


@_op("DequantizeLinear")
def _dequantize_linear(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, s, zp = ins[0], ins[1], _arg(ins, 2)
    axis, block = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0))
    s = _axis_param(s, x.dim(), axis, x.shape, block)
    zp = 0.0 if zp is None else _axis_param(_num(zp), x.dim(), axis, x.shape, block)
    return _dequantize(x, s, zp)


@_op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(tw: OnnxTwin, node: _Node, ins: list) -> tuple:
    x = ins[0].float()
    # Scale and zero point are data-dependent (over the whole batch, as in onnxruntime); they
    # are treated as constants for the gradient.
    with torch.no_grad():
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return _quantize(x, scale, zp, TensorProto.UINT8, tw.ste), scale, zp


def _dq_inputs(ins: list, x_i: int, rank_axis: int = 1) -> torch.Tensor:
    """Dequantize the (x, scale, zero point) triple starting at `x_i` (per-tensor or per-axis)."""
    x, s, zp = ins[x_i], ins[x_i + 1], _arg(ins, x_i + 2)
    s = _axis_param(s, x.dim(), rank_axis, x.shape)
    zp = 0.0 if zp is None else _axis_param(_num(zp), x.dim(), rank_axis, x.shape)
    return _dequantize(x, s, zp)


def _requantize(tw: OnnxTwin, node: _Node, ins: list, y: torch.Tensor, s_i: int) -> torch.Tensor:
    """Quantize a float result with the (scale, zero point) inputs at `s_i`, `s_i + 1`."""
    zp = _arg(ins, s_i + 1)
    return _quantize(y, ins[s_i], 0.0 if zp is None else zp, _qtype(tw, node, s_i + 1), tw.ste)


def _saturates(tw: OnnxTwin, node: _Node, act_zp: int, weight: int) -> bool:
    """Whether this u8 x s8 node saturates pair sums under the twin's isa (int8 x int8 and any uint8
    weight are exact; see rcdeploy.runtime.u8s8)."""
    if tw.isa != "avx2":
        return False
    act = tw._types.get(node.inputs[act_zp], TensorProto.UINT8) if act_zp < len(node.inputs) else TensorProto.UINT8
    return act == TensorProto.UINT8 and tw._types.get(node.inputs[weight]) == TensorProto.INT8


def _conv_saturation(node: _Node, codes: torch.Tensor, zp: float, w_int: torch.Tensor) -> torch.Tensor | None:
    """Pair-saturation error of a conv in integer units [N, M, OH, OW] (None: exact)."""
    if codes.dim() != 4:
        return None  # 1-d / 3-d integer convolutions: not emulated (onnxruntime runs them rarely)
    kernel = list(w_int.shape[2:])
    strides = list(node.attrs.get("strides", [1, 1]))
    dil = list(node.attrs.get("dilations", [1, 1]))
    pads = _pads(node, codes.shape[2:], kernel, strides, dil)
    return u8s8.conv_pair_saturation(codes, zp, w_int, strides=strides, pads=pads, dilations=dil,
                                     group=int(node.attrs.get("group", 1)))


def _rows_saturation(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """Pair-saturation error of [N, K] codes times [M, K] weights: [N, M] (None: exact)."""
    err = u8s8.pair_saturation(codes.reshape(-1, codes.shape[-1], 1), rows)
    return None if err is None else err.reshape(*codes.shape[:-1], rows.shape[0])


def _per_channel(scale: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    s = _num(scale).reshape(-1)
    if s.numel() == 1:
        return s.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return s.reshape(shape)


@_op("QLinearConv")
@_op("QLinearConv", domain=_MS)
def _qlinear_conv(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, w = _dq_inputs(ins, 0), _dq_inputs(ins, 3, rank_axis=0)
    b = _arg(ins, 8)
    if b is not None:
        b = (_num(b) * (ins[1].reshape(-1) * ins[4].reshape(-1))).to(torch.float32)
    last = bool(node.attrs.get("channels_last", 0))
    if last:
        x = x.movedim(-1, 1)
    y = _conv(node, x, w, b)
    if _saturates(tw, node, 2, 3):
        codes = ins[0].movedim(-1, 1) if last else ins[0]
        zp = float(_num(ins[2]).reshape(-1)[0]) if _arg(ins, 2) is not None else 0.0
        err = _conv_saturation(node, codes, zp, _num(ins[3]))
        if err is not None:
            y = y + (err * _num(ins[1]).reshape(()) * _per_channel(ins[4], 4, 1)).to(y.dtype)
    y = _requantize(tw, node, ins, y, 6)
    return y.movedim(1, -1) if last else y


@_op("QLinearMatMul")
def _qlinear_matmul(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a = _dequantize(ins[0], ins[1], _num(ins[2]))
    b = _dequantize(ins[3], ins[4], _num(ins[5]))  # per-column (1-D, length N) broadcasts on the last axis
    y = torch.matmul(a, b)
    if _saturates(tw, node, 2, 3) and ins[3].dim() == 2:
        err = _rows_saturation(ins[0], _num(ins[3]).T)
        if err is not None:
            y = y + (err * _num(ins[1]).reshape(()) * _num(ins[4]).reshape(-1)).to(y.dtype)
    return _requantize(tw, node, ins, y, 6)


@_op("QGemm", domain=_MS)
def _qgemm(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    # onnxruntime: acc = C + sum((a - a_zp)(b - b_zp)); y = acc * alpha * a_s * b_s [/ y_s + y_zp].
    alpha = float(node.attrs.get("alpha", 1.0))
    a = _dequantize(ins[0], ins[1], _num(ins[2]))
    if node.attrs.get("transA", 0):
        a = a.transpose(-1, -2)
    b_raw, b_s, b_zp = ins[3], ins[4].reshape(-1), _num(ins[5]).reshape(-1)
    trans_b = bool(node.attrs.get("transB", 0))
    # Per-column parameters belong to the N axis: the rows of B^T or the columns of B.
    if b_s.numel() > 1:
        b_s = b_s.reshape(-1, 1) if trans_b else b_s
        b_zp = b_zp.reshape(-1, 1) if trans_b else b_zp
    b = _dequantize(b_raw, b_s, b_zp)
    if trans_b:
        b = b.transpose(-1, -2)
    y = a @ b
    if _saturates(tw, node, 2, 3) and not node.attrs.get("transA", 0) and ins[0].dim() == 2:
        rows = _num(b_raw) if trans_b else _num(b_raw).T
        err = _rows_saturation(ins[0], rows)
        if err is not None:
            y = y + (err * _num(ins[1]).reshape(()) * _num(ins[4]).reshape(-1)).to(y.dtype)
    c = _arg(ins, 6)
    if c is not None:
        y = y + (_num(c) * (ins[1].reshape(-1) * ins[4].reshape(-1))).to(torch.float32)
    y = y * alpha
    if len(ins) > 7 and ins[7] is not None:
        return _requantize(tw, node, ins, y, 7)
    return y


@_op("QLinearAdd", "QLinearMul", domain=_MS)
def _qlinear_binary(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a, b = _dq_inputs(ins, 0, -1), _dq_inputs(ins, 3, -1)
    y = a + b if node.op == "QLinearAdd" else a * b
    return _requantize(tw, node, ins, y, 6)


@_op("QLinearGlobalAveragePool", domain=_MS)
def _qlinear_gap(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = _dq_inputs(ins, 0)
    dims = tuple(range(1, x.dim() - 1)) if node.attrs.get("channels_last", 0) else tuple(range(2, x.dim()))
    return _requantize(tw, node, ins, x.mean(dim=dims, keepdim=True), 3)


@_op("QLinearAveragePool", domain=_MS)
def _qlinear_avgpool(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = _dq_inputs(ins, 0)
    if node.attrs.get("channels_last", 0):
        return _requantize(tw, node, ins, _avg_pool(node, x.movedim(-1, 1)), 3).movedim(1, -1)
    return _requantize(tw, node, ins, _avg_pool(node, x), 3)


@_op("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", domain=_MS)
def _qlinear_unary(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = _dq_inputs(ins, 0)
    if node.op == "QLinearSigmoid":
        y = torch.sigmoid(x)
    elif node.op == "QLinearSoftmax":
        y = _softmax(x, int(node.attrs.get("axis", -1)), int(node.attrs.get("opset", 13)), torch.softmax)
    else:
        y = F.leaky_relu(x, float(node.attrs.get("alpha", 0.01)))
    return _requantize(tw, node, ins, y, 3)


@_op("QLinearConcat", domain=_MS)
def _qlinear_concat(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    parts = [_dq_inputs(ins, i) for i in range(2, len(ins), 3)]
    return _requantize(tw, node, ins, torch.cat(parts, dim=int(node.attrs["axis"])), 0)


@_op("MatMulInteger")
def _matmul_integer(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a, b = _num(ins[0]), _num(ins[1])
    a_zp, b_zp = _arg(ins, 2), _arg(ins, 3)
    if a_zp is not None:
        a = a - (_num(a_zp).reshape(-1, 1) if a_zp.numel() > 1 else _num(a_zp).reshape(()))
    if b_zp is not None:
        b = b - _num(b_zp).reshape(()) if b_zp.numel() == 1 else b - _num(b_zp)
    y = torch.matmul(a, b)
    if _saturates(tw, node, 2, 1) and ins[0].dim() == 2 and ins[1].dim() == 2:
        err = _rows_saturation(ins[0], _num(ins[1]).T)
        if err is not None:
            y = y + err.to(y.dtype)
    return y


@_op("MatMulIntegerToFloat", domain=_MS)
def _matmul_integer_to_float(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a_zp, b_zp, bias = _arg(ins, 4), _arg(ins, 5), _arg(ins, 6)
    a = _dequantize(ins[0], ins[2], 0.0 if a_zp is None else _num(a_zp))
    b = _dequantize(ins[1], ins[3], 0.0 if b_zp is None else _num(b_zp))
    y = torch.matmul(a, b)
    return y if bias is None else y + bias


@_op("ConvInteger")
def _conv_integer(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, w = _num(ins[0]), _num(ins[1])
    x_zp, w_zp = _arg(ins, 2), _arg(ins, 3)
    if x_zp is not None:
        x = x - _num(x_zp).reshape(())
    if w_zp is not None:
        w = w - _axis_param(_num(w_zp), w.dim(), 0, w.shape)
    return _conv(node, x.float(), w.float(), None)


# --- convolution, pooling -------------------------------------------------------------------------


def _pads(
    node: _Node,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """Explicit ONNX pads [begin..., end...], resolving auto_pad against the input size."""
    nd = len(spatial)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - small if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(node.attrs.get("pads", [0] * (2 * nd)))


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] -> torch F.pad order (last axis first)."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [int(pads[i]), int(pads[i + nd])]
    return out


def _conv(node: _Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    nd = x.dim() - 2
    if nd not in (1, 2, 3):
        raise UsageError(f"{node.where()}: {nd}-D convolution is not supported by the twin")
    kernel = list(w.shape[2:])
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    pads = _pads(node, x.shape[2:], kernel, strides, dil)
    if pads[:nd] == pads[nd:]:
        padding: Any = pads[:nd]
    else:
        x, padding = F.pad(x, _torch_pad(pads)), 0
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, strides, padding, dil, int(node.attrs.get("group", 1)))


def _max_pool(node: _Node, x: torch.Tensor) -> torch.Tensor:
    nd = x.dim() - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    pads = _pads(node, x.shape[2:], kernel, strides, dil)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if pads[:nd] == pads[nd:] and all(p <= k // 2 for p, k in zip(pads[:nd], kernel)):
        padding: Any = pads[:nd]
    else:
        x, padding = F.pad(x, _torch_pad(pads), value=float("-inf")), 0
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return pool(x, kernel, strides, padding, dil, ceil_mode=ceil)


def _avg_pool(node: _Node, x: torch.Tensor) -> torch.Tensor:
    nd = x.dim() - 2
    if nd not in (1, 2):
        raise UsageError(f"{node.where()}: {nd}-D average pooling is not supported by the twin")
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * nd))
    pads = _pads(node, x.shape[2:], kernel, strides, [1] * nd)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    include = bool(node.attrs.get("count_include_pad", 0))
    if nd == 1:
        x, kernel, strides, pads = x.unsqueeze(-2), [1, *kernel], [1, *strides], [0, pads[0], 0, pads[1]]
    # Sum over each window divided by the number of counted elements: exact for any padding,
    # ceil_mode and count_include_pad (torch's own avg_pool only takes symmetric padding).
    tp = _torch_pad(pads)
    xp = F.pad(x, tp)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(ones, tp, value=1.0 if include else 0.0)
    num = F.avg_pool2d(xp, kernel, strides, 0, ceil, True, divisor_override=1)
    den = F.avg_pool2d(mask, kernel, strides, 0, ceil, True, divisor_override=1)
    y = num / den
    return y.squeeze(-2) if nd == 1 else y


@_op("Conv")
@_op("FusedConv", domain=_MS)
def _conv_op(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    y = _conv(node, ins[0], ins[1], _arg(ins, 2))
    if node.op == "FusedConv":
        act = node.attrs.get("activation", b"")
        act = act.decode() if isinstance(act, bytes) else act
        params = list(node.attrs.get("activation_params", []))
        if act == "Relu":
            y = F.relu(y)
        elif act == "Clip":
            y = torch.clamp(y, params[0], params[1])
        elif act == "LeakyRelu":
            y = F.leaky_relu(y, params[0] if params else 0.01)
        elif act == "Sigmoid":
            y = torch.sigmoid(y)
        elif act == "Tanh":
            y = torch.tanh(y)
        elif act:
            raise UsageError(f"{node.where()}: fused activation {act!r} is not supported by the twin")
        z = _arg(ins, 3)
        if z is not None:
            y = y + z
    return y


@_op("ConvTranspose")
def _conv_transpose(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, w, b = ins[0], ins[1], _arg(ins, 2)
    nd = x.dim() - 2
    if nd not in (1, 2, 3) or "output_shape" in node.attrs:
        raise UsageError(f"{node.where()}: this ConvTranspose form (output_shape, {nd}-D) is not supported")
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if (auto not in ("NOTSET", b"NOTSET", "VALID", b"VALID")) or pads[:nd] != pads[nd:]:
        raise UsageError(f"{node.where()}: asymmetric or SAME padding in ConvTranspose is not supported")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(
        x,
        w,
        b,
        list(node.attrs.get("strides", [1] * nd)),
        pads[:nd],
        list(node.attrs.get("output_padding", [0] * nd)),
        int(node.attrs.get("group", 1)),
        list(node.attrs.get("dilations", [1] * nd)),
    )


@_op("MaxPool")
@_op("NhwcMaxPool", domain=_MS)
def _max_pool_op(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise UsageError(f"{node.where()}: MaxPool indices output is not supported by the twin")
    if node.op == "NhwcMaxPool":
        return _max_pool(node, ins[0].movedim(-1, 1)).movedim(1, -1)
    return _max_pool(node, ins[0])


@_op("AveragePool")
def _avg_pool_op(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return _avg_pool(node, ins[0])


@_op("GlobalAveragePool")
def _gap(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)


@_op("GlobalMaxPool")
def _gmp(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True)


@_op("BatchNormalization")
def _batch_norm(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, scale, bias, mean, var = ins[:5]
    eps = float(node.attrs.get("epsilon", 1e-5))
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + eps)
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


# --- linear algebra, elementwise ------------------------------------------------------------------


@_op("Gemm")
@_op("FusedGemm", domain=_MS)
def _gemm(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a, b, c = ins[0], ins[1], _arg(ins, 2)
    if node.attrs.get("transA", 0):
        a = a.transpose(-1, -2)
    if node.attrs.get("transB", 0):
        b = b.transpose(-1, -2)
    y = float(node.attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(node.attrs.get("beta", 1.0)) * c
    if node.op == "FusedGemm":
        act = node.attrs.get("activation", b"")
        act = act.decode() if isinstance(act, bytes) else act
        if act == "Relu":
            y = F.relu(y)
        elif act:
            raise UsageError(f"{node.where()}: fused activation {act!r} is not supported by the twin")
    return y


@_op("MatMul")
def _matmul(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return torch.matmul(ins[0], ins[1])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _Op:
    def op(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
        a, b = ins[0], ins[1]
        if a.is_floating_point() != b.is_floating_point():
            a, b = _num(a), _num(b)
        return fn(a, b)

    return op


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


_op("Add")(_binary(torch.add))
_op("Sub")(_binary(torch.sub))
_op("Mul")(_binary(torch.mul))
_op("Div")(_binary(_div))
_op("Pow")(_binary(torch.pow))


@_op("Max", "Min", "Sum", "Mean")
def _variadic(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    y = ins[0]
    for t in ins[1:]:
        y = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op, torch.add)(y, t)
    return y / len(ins) if node.op == "Mean" else y


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Reciprocal": torch.reciprocal,
    "Sign": torch.sign,
    "Softplus": F.softplus,
    "Round": torch.round,
    "Identity": lambda t: t,
}


@_op(*_UNARY)
def _unary(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return _UNARY[node.op](ins[0])


@_op("Dropout")
def _dropout(tw: OnnxTwin, node: _Node, ins: list) -> Any:
    if len(node.outputs) > 1 and node.outputs[1]:
        return ins[0], torch.ones_like(ins[0], dtype=torch.bool)
    return ins[0]


@_op("LeakyRelu")
def _leaky_relu(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return F.leaky_relu(ins[0], float(node.attrs.get("alpha", 0.01)))


@_op("Elu")
def _elu(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return F.elu(ins[0], float(node.attrs.get("alpha", 1.0)))


@_op("PRelu")
def _prelu(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return torch.where(ins[0] < 0, ins[0] * ins[1], ins[0])


@_op("HardSigmoid")
def _hard_sigmoid(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a, b = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return torch.clamp(a * ins[0] + b, 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return ins[0] * torch.clamp(ins[0] / 6.0 + 0.5, 0.0, 1.0)


@_op("Clip")
def _clip(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    lo, hi = _arg(ins, 1), _arg(ins, 2)
    lo = float(lo) if lo is not None else node.attrs.get("min")
    hi = float(hi) if hi is not None else node.attrs.get("max")
    return torch.clamp(ins[0], lo, hi)


def _softmax(x: torch.Tensor, axis: int, opset: int, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    if opset >= 13:
        return fn(x, dim=axis)
    # Before opset 13 the input is flattened to 2-D at `axis`.
    axis %= max(x.dim(), 1)
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    return fn(flat, dim=1).reshape(x.shape)


def _softmax_like(fn: Callable[..., torch.Tensor]) -> _Op:
    def op(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
        default = -1 if tw.opset >= 13 else 1
        return _softmax(ins[0], int(node.attrs.get("axis", default)), tw.opset, fn)

    return op


_op("Softmax")(_softmax_like(torch.softmax))
_op("LogSoftmax")(_softmax_like(torch.log_softmax))


def _reduce_axes(tw: OnnxTwin, node: _Node, ins: list) -> list[int] | None:
    axes = _ints(_arg(ins, 1)) if _arg(ins, 1) is not None else list(node.attrs.get("axes", []))
    if not axes:
        return [] if node.attrs.get("noop_with_empty_axes", 0) else None
    return axes


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    axes = _reduce_axes(tw, node, ins)
    if axes == []:
        return x
    dims = tuple(range(x.dim())) if axes is None else tuple(a % x.dim() for a in axes)
    keep = bool(node.attrs.get("keepdims", 1))
    if node.op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if node.op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    return (x.amax if node.op == "ReduceMax" else x.amin)(dim=dims, keepdim=keep)


# --- shapes and data movement -----------------------------------------------------------------------


@_op("Flatten")
def _flatten(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    axis = int(node.attrs.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@_op("Reshape")
def _reshape(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, shape = ins[0], _ints(ins[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("Transpose")
def _transpose(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    perm = node.attrs.get("perm") or list(reversed(range(ins[0].dim())))
    return ins[0].permute(*perm)


@_op("Concat")
def _concat(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    parts = [t for t in ins if t is not None]
    if any(t.is_floating_point() for t in parts) and not all(t.is_floating_point() for t in parts):
        parts = [_num(t) for t in parts]
    return torch.cat(parts, dim=int(node.attrs["axis"]))


@_op("Shape")
def _shape(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    dims = list(ins[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64, device=ins[0].device)


@_op("Size")
def _size(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    return torch.tensor(ins[0].numel(), dtype=torch.int64, device=ins[0].device)


@_op("Gather")
def _gather(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    data, idx = ins[0], ins[1].long()
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1).to(data.device))
    return out.reshape([*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]])


@_op("Unsqueeze")
def _unsqueeze(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    axes = _ints(_arg(ins, 1)) if _arg(ins, 1) is not None else list(node.attrs["axes"])
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@_op("Squeeze")
def _squeeze(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    axes = _ints(_arg(ins, 1)) if _arg(ins, 1) is not None else list(node.attrs.get("axes", []))
    if not axes:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@_op("Slice")
def _slice(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    if len(ins) > 1:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(_arg(ins, 3)) if _arg(ins, 3) is not None else list(range(len(starts)))
        steps = _ints(_arg(ins, 4)) if _arg(ins, 4) is not None else [1] * len(starts)
    else:  # opset < 10: attributes
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise UsageError(f"{node.where()}: Slice step 0 is invalid")
        a %= x.dim()
        # Python's slice clamping is ONNX's (INT64 min/max stand for "to the end")
        lo, hi, st = slice(s, e, st).indices(x.shape[a])
        if st > 0:
            x = x[(slice(None),) * a + (slice(lo, hi, st),)]
        else:  # torch has no negative-step slicing
            x = torch.index_select(x, a, torch.arange(lo, hi, st, device=x.device))
    return x


@_op("Split")
def _split(tw: OnnxTwin, node: _Node, ins: list) -> tuple:
    x, axis = ins[0], int(node.attrs.get("axis", 0))
    sizes = _ints(_arg(ins, 1)) if _arg(ins, 1) is not None else list(node.attrs.get("split", []))
    if not sizes:
        n = len(node.outputs)
        size = math.ceil(x.shape[axis] / n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Expand")
def _expand(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    shape = torch.broadcast_shapes(tuple(ins[0].shape), tuple(_ints(ins[1])))
    return ins[0].expand(shape)


@_op("ConstantOfShape")
def _constant_of_shape(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    value = node.attrs.get("value")
    fill = torch.zeros(1) if value is None else _tensor_from_proto(value)[0]
    return fill.reshape(-1)[0].to(ins[0].device).expand(_ints(ins[0])).clone()


@_op("Pad")
def _pad(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(ins) > 1 and ins[1] is not None:
        pads = _ints(ins[1])
        value = _arg(ins, 2)
        value = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
        axes = _ints(_arg(ins, 3)) if _arg(ins, 3) is not None else list(range(x.dim()))
    else:  # opset < 11: attributes
        pads, value, axes = (
            list(node.attrs["pads"]),
            float(node.attrs.get("value", 0.0)),
            list(range(x.dim())),
        )
    n = len(axes)
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        full[a % x.dim()], full[a % x.dim() + x.dim()] = pads[i], pads[i + n]
    if mode == "constant":
        return F.pad(x, _torch_pad(full), value=value)
    lead = full[:2] + full[x.dim() : x.dim() + 2]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or any(lead):
        raise UsageError(f"{node.where()}: Pad mode {mode!r} on these axes is not supported by the twin")
    spatial = full[2 : x.dim()] + full[x.dim() + 2 :]
    return F.pad(x, _torch_pad(spatial), mode=torch_mode)


_ONNX_TO_TORCH_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@_op("Cast")
def _cast(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, to = ins[0], int(node.attrs["to"])
    if to in _ONNX_TO_TORCH_FLOAT:
        return x.to(torch.float32)  # the twin computes in float32 whatever the float width
    if to == TensorProto.BOOL:
        return x != 0
    if to in _INTS:
        if not x.is_floating_point():
            return x.to(torch.int64)
        # float -> int truncates; keep the float carrier so gradients flow (straight through).
        return _TruncSTE.apply(x) if tw.ste else torch.trunc(x)
    raise UsageError(
        f"{node.where()}: Cast to {helper.tensor_dtype_to_string(to)} is not supported by the twin"
    )


@_op("Constant")
def _constant(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    a = node.attrs
    if "value" in a:
        return _tensor_from_proto(a["value"])[0]
    if "value_float" in a:
        return torch.tensor(float(a["value_float"]), dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(int(a["value_int"]), dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    raise UsageError(f"{node.where()}: this Constant form ({', '.join(a)}) is not supported by the twin")


# --- noise --------------------------------------------------------------------------------------------


@_op("RandomNormalLike")
def _random_normal_like(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    mean, scale = float(node.attrs.get("mean", 0.0)), float(node.attrs.get("scale", 1.0))
    if not tw.noise:
        return torch.full_like(x, mean, dtype=torch.float32)  # the noise's expectation (zeros for mean 0)
    return torch.randn_like(x, dtype=torch.float32) * scale + mean


@_op("RandomUniformLike")
def _random_uniform_like(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    low, high = float(node.attrs.get("low", 0.0)), float(node.attrs.get("high", 1.0))
    if not tw.noise:
        return torch.full_like(x, (low + high) / 2, dtype=torch.float32)
    return torch.rand_like(x, dtype=torch.float32) * (high - low) + low


# ------------------------------------------------------------- u8 x s8 saturation of fused QDQ nodes


@dataclass
class _IntWeight:
    """A constant int8 weight as a DequantizeLinear read it."""

    codes: torch.Tensor  # integer values (float carrier)
    scale: torch.Tensor
    axis: int

    def key(self) -> tuple:
        return _weight_key(self.codes.to(torch.int64).numpy())


def _weight_key(values: np.ndarray) -> tuple:
    return (tuple(values.shape), values.astype(np.int8).tobytes())


@dataclass
class _QdqSaturation:
    """How to add the pair-saturation error to a float Conv / Gemm / MatMul that onnxruntime runs as a
    u8 x s8 kernel: the activation codes (the input of its DequantizeLinear) and the weight integers."""

    codes: str  # name of the 8-bit activation tensor
    zp: float
    x_scale: float
    weight: _IntWeight
    shift: float = 0.0  # added to the codes and zero point: int8 activations become the kernel's uint8

    def apply(self, node: _Node, codes: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weight.codes.to(torch.float64)
        codes = codes.to(torch.float64) + self.shift
        if node.op == "Conv":
            err = _conv_saturation(node, codes, self.zp + self.shift, w)
            scale = _per_channel(self.weight.scale, 4, 1)
        else:
            trans = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
            if codes.dim() != 2 or w.dim() != 2 or (node.op == "Gemm" and node.attrs.get("transA", 0)):
                return y
            err = _rows_saturation(codes, w if trans else w.T)
            scale = _num(self.weight.scale).reshape(-1)
            scale = scale * float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else scale
        if err is None:
            return y
        # A constant for the gradient: backward is the exact op's (the saturated pairs' own gradient is 0).
        return y + (err * self.x_scale * scale).to(y.dtype).detach()


def _qdq_saturating_nodes(model: onnx.ModelProto, live: list[_Node], weights: dict[str, _IntWeight],
                          types: dict[str, int], consts: dict[str, torch.Tensor]) -> dict[int, _QdqSaturation]:
    """The live Conv / Gemm / MatMul nodes that onnxruntime fuses into a u8 x s8 kernel whose pairs can
    saturate, found on its optimized graph by node name (onnxruntime keeps it as a prefix) or by weight."""
    from rcdeploy.runtime.session import optimized_graph

    opt = optimized_graph(model)
    inits = {t.name: t for t in opt.graph.initializer}
    names: set[str] = set()
    keys: set[tuple] = set()
    for n in opt.graph.node:
        check = u8s8.check_node(n, inits)
        # ConvInteger: held to the static bound, but onnxruntime computes it exactly (measured).
        if check is None or check.form != "u8s8" or not check.can_saturate or n.op_type == "ConvInteger":
            continue
        names.add(n.name)
        w = inits[n.input[u8s8.KERNELS[n.op_type].weight]]
        keys.add(_weight_key(numpy_helper.to_array(w)))
    producers = {o: n for n in live for o in n.outputs}
    out: dict[int, _QdqSaturation] = {}
    for i, node in enumerate(live):
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] not in weights:
            continue
        dq = producers.get(node.inputs[0])
        if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 2:
            continue
        zp_name = dq.inputs[2] if len(dq.inputs) > 2 else ""
        act_type = types.get(zp_name, TensorProto.UINT8) if zp_name else TensorProto.UINT8
        if act_type not in (TensorProto.UINT8, TensorProto.INT8):
            continue
        w = weights[node.inputs[1]]
        fused = bool(node.name) and any(k == node.name or k.startswith(node.name + "_") for k in names)
        if not (fused or w.key() in keys):
            continue
        scale, zp = consts.get(dq.inputs[1]), consts.get(zp_name) if zp_name else torch.zeros(())
        if scale is None or zp is None or scale.numel() != 1 or zp.numel() != 1:
            continue  # per-channel or computed activation parameters: not a fusable QDQ unit
        # onnxruntime runs int8 activations of QDQ units as uint8 (x + 128) on x86: the kernels are u8 x s8.
        shift = 128.0 if act_type == TensorProto.INT8 else 0.0
        out[i] = _QdqSaturation(dq.inputs[0], float(zp.reshape(())), float(scale.reshape(())), w, shift)
    return out


# ------------------------------------------------------------------------------------------- the twin


def _topological(nodes: list[_Node], available: set[str]) -> list[_Node]:
    """Nodes in an order where every input is produced first (Kahn's algorithm, stable)."""
    producers = {o: i for i, n in enumerate(nodes) for o in n.outputs if o}
    deps = [{producers[x] for x in n.inputs if x and x in producers and x not in available} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    order: list[int] = []
    remaining = [len(d) for d in deps]
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users.get(i, []):
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise UsageError("the ONNX graph has a cycle; it is not a valid model")
    return [nodes[i] for i in order]


class OnnxTwin(nn.Module):
    """A torch module that computes what onnxruntime computes for an ONNX classifier.

    Takes one float input (any batch size, on any device the module is moved to) and returns
    the first graph output, differentiable with respect to the input. Initializers and folded
    constants are buffers. `ste` selects straight-through rounding in QuantizeLinear (see the
    module docstring); `noise=False` replaces RandomNormalLike / RandomUniformLike by their
    mean, for a deterministic twin of a noise-injecting model.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, *, ste: bool = True, noise: bool = True,
                 isa: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            model = load_model_proto(model)  # the one place files are parsed and checked
        self.ste, self.noise = ste, noise
        self.isa = resolve_isa(isa)
        graph = model.graph
        opsets = {imp.domain or _STD: imp.version for imp in model.opset_import}
        self.opset = int(opsets.get(_STD, opsets.get("ai.onnx", 21)))

        consts: dict[str, torch.Tensor] = {}
        self._types: dict[str, int] = {}
        for t in graph.initializer:
            consts[t.name], self._types[t.name] = _tensor_from_proto(t)
        for t in graph.sparse_initializer:
            raise UsageError(f"sparse initializer {t.values.name!r} is not supported by the twin")
        inputs = [vi.name for vi in graph.input if vi.name not in consts]
        if len(inputs) != 1:
            raise UsageError(
                f"the twin takes models with exactly one input; this one has {len(inputs)}: {inputs}"
            )
        self.input_name = inputs[0]
        self.output_names = [o.name for o in graph.output]

        nodes = []
        for n in graph.node:
            node = _Node(
                n.name,
                n.op_type,
                "" if n.domain in ("", "ai.onnx") else n.domain,
                list(n.input),
                list(n.output),
                {a.name: helper.get_attribute_value(a) for a in n.attribute},
            )
            if (node.domain, node.op) not in _OPS:
                where = f"{node.domain}:{node.op}" if node.domain else node.op
                raise UsageError(
                    f"op {where} (node {n.name!r}) is not supported by the differentiable twin "
                    f"(it interprets the {len(_OPS)} ops listed by rcdeploy.deploy.twin.supported_ops())"
                )
            nodes.append(node)
        nodes = _topological(nodes, set(consts) | {self.input_name})
        known = set(consts) | {self.input_name} | {o for n in nodes for o in n.outputs}
        for node in nodes:
            missing = [x for x in node.inputs if x and x not in known]
            if missing:
                raise UsageError(
                    f"{node.where()} reads {missing[0]!r}, which no node, input or initializer provides"
                )

        # Fold every node whose inputs are all constants (weight dequantization, Constant,
        # shape arithmetic on constants): the forward pass then runs only what depends on x.
        live: list[_Node] = []
        weights: dict[str, _IntWeight] = {}  # folded DequantizeLinear outputs -> their integers and scale
        with torch.no_grad():
            for node in nodes:
                if node.op not in _NO_FOLD and all(not x or x in consts for x in node.inputs):
                    outs = self._run_node(node, [consts[x] if x else None for x in node.inputs])
                    for name, value in zip(node.outputs, outs):
                        if name:
                            consts[name] = value
                    if node.op == "DequantizeLinear" and self._types.get(node.inputs[0]) == TensorProto.INT8:
                        weights[node.outputs[0]] = _IntWeight(consts[node.inputs[0]], consts[node.inputs[1]],
                                                              int(node.attrs.get("axis", 1)))
                    if node.op == "Constant" and "value" in node.attrs:
                        self._types[node.outputs[0]] = node.attrs["value"].data_type
                    elif node.op in ("Identity", "Cast") and node.inputs[0] in self._types:
                        to = node.attrs.get("to", self._types[node.inputs[0]])
                        self._types[node.outputs[0]] = int(to)
                else:
                    live.append(node)
        self._nodes = live
        self._qdq_saturation: dict[int, _QdqSaturation] = {}
        if self.isa == "avx2":
            self._qdq_saturation = _qdq_saturating_nodes(model, live, weights, self._types, consts)

        needed = {x for n in live for x in n.inputs if x} | set(self.output_names)
        self._const_attr: dict[str, str] = {}
        for i, (name, value) in enumerate(consts.items()):
            if name in needed:
                attr = f"const_{i}"
                self.register_buffer(attr, value)
                self._const_attr[name] = attr

    def _run_node(self, node: _Node, ins: list) -> list:
        out = _OPS[(node.domain, node.op)](self, node, ins)
        return list(out) if isinstance(out, tuple) else [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (the first graph output) for a float input batch."""
        env: dict[str, torch.Tensor] = {name: getattr(self, attr) for name, attr in self._const_attr.items()}
        env[self.input_name] = x.float()
        for i, node in enumerate(self._nodes):
            outs = self._run_node(node, [env[n] if n else None for n in node.inputs])
            sat = self._qdq_saturation.get(i)
            if sat is not None:
                outs[0] = sat.apply(node, env[sat.codes], outs[0])
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        return env[self.output_names[0]]


def build_twin(path_or_proto: onnx.ModelProto | str | Path, **kw: Any) -> OnnxTwin:
    """An `OnnxTwin` in eval mode for a file or proto; `kw` go to the constructor (ste, noise, isa)."""
    return OnnxTwin(path_or_proto, **kw).eval()
