"""The QOperator forms onnxruntime's quantizer writes (QLinearConv, QGemm, QLinearAdd, ...) and
the *Integer ops, computed as dequantize -> float op -> quantize (what their integer kernels
compute up to float rounding of the requantization scale), plus the AVX2 saturation error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rcdeploy.deploy.twin.conv_pool import _avg_pool, _conv
from rcdeploy.deploy.twin.linalg_elementwise import _softmax
from rcdeploy.deploy.twin.quantization import _dq_inputs, _requantize
from rcdeploy.deploy.twin.registry import _MS, _arg, _Node, _op
from rcdeploy.deploy.twin.saturation import _conv_saturation, _per_channel, _rows_saturation, _saturates
from rcdeploy.deploy.twin.tensors import _axis_param, _dequantize, _num

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


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
