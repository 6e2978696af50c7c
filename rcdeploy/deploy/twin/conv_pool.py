"""Convolution, pooling and BatchNormalization, with ONNX padding (auto_pad, asymmetric pads)
resolved exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rcdeploy.deploy.twin.registry import _MS, _arg, _Node, _op
from rcdeploy.errors import UsageError

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


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
