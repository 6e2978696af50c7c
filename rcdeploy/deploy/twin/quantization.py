"""QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, and the helpers the QOperator ops
share to dequantize their inputs and requantize their result."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from onnx import TensorProto, helper

from rcdeploy.deploy.twin.registry import _arg, _Node, _op
from rcdeploy.deploy.twin.tensors import _QRANGE, _axis_param, _dequantize, _num, _quantize
from rcdeploy.errors import UsageError

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


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


@_op("QuantizeLinear")
def _quantize_linear(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x, s, zp = ins[0], ins[1], _arg(ins, 2)
    axis, block = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0))
    s = _axis_param(s, x.dim(), axis, x.shape, block)
    zp = 0.0 if zp is None else _axis_param(zp, x.dim(), axis, x.shape, block)
    return _quantize(x.float(), s, zp, _qtype(tw, node, 2), tw.rounding)


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
    return _quantize(x, scale, zp, TensorProto.UINT8, tw.rounding), scale, zp


def _dq_inputs(ins: list, x_i: int, rank_axis: int = 1) -> torch.Tensor:
    """Dequantize the (x, scale, zero point) triple starting at `x_i` (per-tensor or per-axis)."""
    x, s, zp = ins[x_i], ins[x_i + 1], _arg(ins, x_i + 2)
    s = _axis_param(s, x.dim(), rank_axis, x.shape)
    zp = 0.0 if zp is None else _axis_param(_num(zp), x.dim(), rank_axis, x.shape)
    return _dequantize(x, s, zp)


def _requantize(tw: OnnxTwin, node: _Node, ins: list, y: torch.Tensor, s_i: int) -> torch.Tensor:
    """Quantize a float result with the (scale, zero point) inputs at `s_i`, `s_i + 1`."""
    zp = _arg(ins, s_i + 1)
    return _quantize(y, ins[s_i], 0.0 if zp is None else zp, _qtype(tw, node, s_i + 1), tw.rounding)
