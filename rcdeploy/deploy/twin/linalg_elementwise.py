"""Gemm / MatMul, elementwise arithmetic and activations, softmax and reductions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from rcdeploy.deploy.twin.registry import _MS, _arg, _Node, _Op, _op
from rcdeploy.deploy.twin.tensors import _ints, _num
from rcdeploy.errors import UsageError

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


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
