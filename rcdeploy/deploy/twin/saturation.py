"""The AVX2 u8 x s8 emulation glue: where onnxruntime's kernels on x86 CPUs without VNNI add
neighbouring u8 x s8 products in int16 with saturation, the error to add (`rcdeploy.runtime.u8s8`
computes it), for QOperator nodes directly and for QDQ nodes that onnxruntime fuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from rcdeploy.deploy.twin.conv_pool import _pads
from rcdeploy.deploy.twin.registry import _Node
from rcdeploy.deploy.twin.tensors import _num
from rcdeploy.runtime import u8s8

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


def _saturates(tw: OnnxTwin, node: _Node, act_zp: int, weight: int) -> bool:
    """Whether this u8 x s8 node saturates pair sums under the twin's isa (int8 x int8 and any uint8
    weight are exact; see rcdeploy.runtime.u8s8)."""
    if tw.isa != "avx2" or tw.smooth:  # the smooth surrogate's codes are not integers: nothing to emulate
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
