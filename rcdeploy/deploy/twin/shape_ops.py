"""Shapes and data movement (Reshape, Gather, Slice, Pad, ...), Cast and Constant."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from rcdeploy.deploy.twin.conv_pool import _torch_pad
from rcdeploy.deploy.twin.registry import _arg, _Node, _op
from rcdeploy.deploy.twin.tensors import _INTS, _ints, _num, _tensor_from_proto, _TruncSTE
from rcdeploy.errors import UsageError

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


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
