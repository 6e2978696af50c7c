"""What onnxruntime's 8-bit integer kernels compute on x86 without VNNI, and a static proof that they cannot differ.

onnxruntime's MLAS multiplies uint8 activations by int8 weights on x86 without VNNI (AVX2, AVX-512
without VNNI) with VPMADDUBSW: each pair of neighbouring products along the reduction axis K is added
into an int16 *with saturation* before the int32 sum. Where |a_i w_i + a_j w_j| > 32,767 the result
is silently wrong; with VNNI, AMX or on ARM it is exact.

Measured here, bit for bit, on onnxruntime 1.32 running under `qemu-x86_64 -cpu Haswell` (an AVX2
CPU without VNNI) against the emulation below:

* QLinearConv (not depthwise), QGemm, MatMulInteger (so also QLinearMatMul and the QDQ forms fused
  into them): the pairs are K indices (0, 1), (2, 3), ... of the im2col row in (ky, kx, c) order
  (onnxruntime runs convolutions NHWC), each group separately, K padded with one zero when odd;
  padded border pixels hold the activation zero point.
* depthwise QLinearConv (one input and one output channel per group), ConvInteger, every uint8 x
  uint8 kernel, and int8 x int8 QLinearConv (raw signed codes: |a| <= 128, so no weight in
  [-127, 127] can overflow a pair): exact.

The static proof (`check_graph`) is conservative and ignores the pairing order: for every output
channel it bounds |a_i w_i + a_j w_j| over ANY two weights of the row and any activations in
[0, 255], so a file that passes cannot saturate on any pairwise-int16 implementation. Only
same-sign weights can overflow (a >= 0): the bound is 255 * (sum of the two largest same-sign
magnitudes). |w| <= 64 everywhere is sufficient (2 x 255 x 64 = 32,640). ConvInteger is held to the
bound too, although onnxruntime 1.32 computes it exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

__all__ = ["INT16_MAX", "ACT_MAX", "SAFE_WEIGHT", "KernelCheck", "check_graph", "worst_pair_sums",
           "pair_saturation", "conv_pair_saturation", "summarize"]

INT16_MAX = 32767
ACT_MAX = 255  # uint8 activations; int8 ones are shifted by 128 into the same range on x86
SAFE_WEIGHT = 64  # |w| <= 64 for every weight of a u8 x s8 kernel proves it exact: 2 * 255 * 64 = 32,640


@dataclass(frozen=True)
class _Operands:
    """Where an integer kernel keeps its activation and weight, and how its weight is laid out."""

    act_zp: int | None  # index of the activation zero point (its type is the activation's type)
    weight: int
    layout: str  # "conv" [M, C/g, k...]; "gemm" (transB decides); "matmul" [K, N]


# onnxruntime CPU integer kernels that multiply an 8-bit activation by an 8-bit weight.
KERNELS: dict[str, _Operands] = {
    "QLinearConv": _Operands(2, 3, "conv"),
    "NhwcQLinearConv": _Operands(2, 3, "conv"),
    "ConvInteger": _Operands(2, 1, "conv"),
    "QGemm": _Operands(2, 3, "gemm"),
    "QLinearMatMul": _Operands(2, 3, "matmul"),
    "MatMulInteger": _Operands(2, 1, "matmul"),
    "MatMulIntegerToFloat": _Operands(4, 1, "matmul"),
    "DynamicQuantizeMatMul": _Operands(None, 1, "matmul"),
}


@dataclass
class KernelCheck:
    """The int16 pair-sum check of one integer kernel.

    form: "u8s8" (pairwise int16 on x86 without VNNI; bounded below), "s8s8" (int8 activations, bounded
    with |a| <= 128), "u8u8" (uint8 weights: exact),
    "depthwise" (onnxruntime's depthwise kernel: exact), "s8u8" (int8 activations times uint8
    weights: the activations are the int8 operand and cannot be bounded), or "dynamic" (weights are
    not constants: nothing to prove from the file).
    """

    node: str
    op: str
    form: str
    worst_pair: int | None  # max |a_i w_i + a_j w_j| over any weight pair of a row, a in [0, 255]
    max_abs_weight: int | None
    channels_over: int = 0  # output channels whose bound exceeds INT16_MAX
    limit: int = INT16_MAX

    @property
    def can_saturate(self) -> bool:
        if self.form in ("u8u8", "depthwise"):
            return False
        return self.worst_pair is None or self.worst_pair > self.limit

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "can_saturate": self.can_saturate}


def worst_pair_sums(rows: np.ndarray, act_max: int = ACT_MAX) -> np.ndarray:
    """Per row (output channel) of integer weights [M, K]: the largest |a_i w_i + a_j w_j|, a in [0, act_max]."""
    r = rows.reshape(len(rows), -1).astype(np.int64)
    if r.shape[1] == 0:
        return np.zeros(len(r), np.int64)
    pos = -np.sort(-np.where(r > 0, r, 0), axis=1)
    neg = -np.sort(-np.where(r < 0, -r, 0), axis=1)

    def top_two(s: np.ndarray) -> np.ndarray:
        return s[:, 0] + (s[:, 1] if s.shape[1] > 1 else 0)

    # Opposite signs partly cancel: their worst case is the single largest product.
    return act_max * np.maximum(np.maximum(top_two(pos), top_two(neg)), np.abs(r).max(1))


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _weight_rows(node: onnx.NodeProto, w: np.ndarray, layout: str) -> np.ndarray:
    """The weight as [output channels, K]."""
    if layout == "conv":
        return w.reshape(w.shape[0], -1)
    if layout == "gemm" and _attr(node, "transB", 0):
        return w.reshape(w.shape[0], -1)
    return np.swapaxes(w.reshape(-1, *w.shape[-2:]), -1, -2).reshape(-1, w.shape[-2])


def _is_depthwise(node: onnx.NodeProto, w: np.ndarray) -> bool:
    group = _attr(node, "group", 1)
    return group > 1 and w.shape[1] == 1 and w.shape[0] == group


def check_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> KernelCheck | None:
    """The check of one node of onnxruntime's optimized graph (None: not an 8-bit integer kernel)."""
    spec = KERNELS.get(node.op_type)
    if spec is None:
        return None
    name = node.name or node.output[0]
    w_name = node.input[spec.weight] if spec.weight < len(node.input) else ""
    if w_name not in inits:
        return KernelCheck(name, node.op_type, "dynamic", None, None)
    w_proto = inits[w_name]
    w = numpy_helper.to_array(w_proto)
    act_type = TensorProto.UINT8
    if spec.act_zp is not None and spec.act_zp < len(node.input) and node.input[spec.act_zp] in inits:
        act_type = inits[node.input[spec.act_zp]].data_type
    if w_proto.data_type == TensorProto.UINT8:
        form = "u8u8" if act_type == TensorProto.UINT8 else "s8u8"
        return KernelCheck(name, node.op_type, form, None if form == "s8u8" else 0, int(np.abs(w).max(initial=0)))
    if spec.layout == "conv" and node.op_type != "ConvInteger" and _is_depthwise(node, w):
        return KernelCheck(name, node.op_type, "depthwise", None, int(np.abs(w.astype(np.int64)).max(initial=0)))
    # int8 x int8 kernels multiply the raw signed codes (|a| <= 128): measured exact, and bounded the same way.
    form, act_max = ("s8s8", 128) if act_type == TensorProto.INT8 else ("u8s8", ACT_MAX)
    bounds = worst_pair_sums(_weight_rows(node, w, spec.layout), act_max)
    return KernelCheck(name, node.op_type, form, int(bounds.max(initial=0)),
                       int(np.abs(w.astype(np.int64)).max(initial=0)), int((bounds > INT16_MAX).sum()))


def check_graph(model: onnx.ModelProto) -> list[KernelCheck]:
    """The int16 pair-sum check of every 8-bit integer kernel in a graph (run it on onnxruntime's
    optimized graph: that is where QDQ patterns have become the kernels that run)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [c for n in model.graph.node if (c := check_node(n, inits)) is not None]


def summarize(checks: list[KernelCheck]) -> dict[str, Any]:
    """What a report or the model card records of a check."""
    bad = [c for c in checks if c.can_saturate]
    pairs = [c.worst_pair for c in checks if c.form in ("u8s8", "s8s8") and c.worst_pair is not None]
    return {
        "kernels": len(checks),
        "saturation_free": not bad,
        "can_saturate": [c.node for c in bad],
        "worst_pair": max(pairs) if pairs else None,
        "limit": INT16_MAX,
        "forms": {f: sum(c.form == f for c in checks) for f in sorted({c.form for c in checks})},
        "per_kernel": [c.to_dict() for c in checks],
    }


# ---------------------------------------------------------------------------------------- emulation

_CHUNK_ELEMENTS = 1 << 24  # pair products held at once while emulating (64 MiB of float32)


def pair_saturation(cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """The error pairwise int16 saturation adds to integer dot products (0 where nothing saturates).

    cols: [N, K, L] raw 8-bit activation codes (float tensors holding integers), K in the kernel's
    order; rows: [M, K] integer weights. Returns [N, M, L]: sum over pairs of clamp(p) - p, with
    p = a_2j w_2j + a_2j+1 w_2j+1; None when no pair of `rows` can reach the int16 limit (only pairs
    that can are formed, so a saturation-free layer costs one bound check).
    """
    n, k, length = cols.shape
    m = rows.shape[0]
    if k % 2:
        cols = F.pad(cols, (0, 0, 0, 1))
        rows = F.pad(rows, (0, 1))
    w = rows.to(torch.float64).reshape(m, -1, 2)
    risky = ((w.abs().sum(-1) * ACT_MAX) > INT16_MAX).any(0).nonzero().reshape(-1)
    if risky.numel() == 0:
        return None
    out = torch.zeros(n, m, length, dtype=torch.float64, device=cols.device)
    a = cols.to(torch.float64).reshape(n, -1, 2, length)[:, risky]  # [N, J, 2, L]
    w = w[:, risky]  # [M, J, 2]
    step = max(1, _CHUNK_ELEMENTS // max(1, m * risky.numel() * length))
    for i in range(0, n, step):
        p = torch.einsum("njtl,mjt->nmjl", a[i:i + step], w)
        out[i:i + step] = (p.clamp(-INT16_MAX - 1, INT16_MAX) - p).sum(2)
    return out


def conv_pair_saturation(x_codes: torch.Tensor, x_zp: float, w_int: torch.Tensor, *, strides: list[int],
                         pads: list[int], dilations: list[int], group: int) -> torch.Tensor | None:
    """`pair_saturation` of a 2-d convolution ([N, C, H, W] codes, [M, C/g, kh, kw] weights, pads
    [top, left, bottom, right]): [N, M, OH, OW], or None where it is exact (depthwise, safe weights)."""
    n, c, h, wd = x_codes.shape
    m, cg, kh, kw = w_int.shape
    if group > 1 and cg == 1 and m == group:
        return None  # onnxruntime's depthwise kernel accumulates exactly
    # Padded pixels hold the zero point: pad the centred codes with 0, then shift back.
    x = F.pad(x_codes.to(torch.float64) - x_zp, (pads[1], pads[3], pads[0], pads[2])) + x_zp
    oh = (x.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (x.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    mg = m // group
    parts = []
    for g in range(group):
        cols = F.unfold(x[:, g * cg:(g + 1) * cg], (kh, kw), dilation=dilations, stride=strides)
        # unfold orders K as (c, ky, kx); onnxruntime's NHWC im2col as (ky, kx, c).
        cols = cols.reshape(n, cg, kh * kw, -1).transpose(1, 2).reshape(n, kh * kw * cg, -1)
        rows = w_int[g * mg:(g + 1) * mg].to(torch.float64).permute(0, 2, 3, 1).reshape(mg, -1)
        err = pair_saturation(cols, rows)
        parts.append(err if err is not None else torch.zeros(n, mg, cols.shape[-1], dtype=torch.float64))
    if all(not p.any() for p in parts):
        return None
    return torch.cat(parts, 1).reshape(n, m, oh, ow)
