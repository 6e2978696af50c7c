"""Facts about an ONNX graph that export, deploy and the benchmarks all need, in one place.

Which ops are integer kernels in onnxruntime (after its QDQ fusion), how many multiply-accumulates a
conv / matmul node does, how many bytes the initializers take by element type, and the shapes behind
those counts (onnx shape inference, with hand rules for the com.microsoft ops it does not know).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from rcdeploy.errors import UsageError

# onnxruntime CPU kernels that compute a conv / matmul on integers (after its QDQ fusion) ...
INTEGER_KERNELS = frozenset({"QLinearConv", "NhwcQLinearConv", "ConvInteger", "QGemm", "QLinearMatMul",
                             "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
# ... and in float (NCHWc / NHWC layout forms included).
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "NhwcConv", "Gemm", "FusedGemm", "MatMul",
                           "FusedMatMul", "ConvTranspose"})
# Every op that computes on integers (the MAC-free ones count as integer nodes too).
INTEGER_OPS = INTEGER_KERNELS | frozenset(
    {
        "QLinearAdd",
        "QLinearMul",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
    }
)
# op -> index of its weight
_CONV_W = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "NhwcConv": 1, "ConvInteger": 1, "QLinearConv": 3,
           "NhwcQLinearConv": 3}
_GEMM_A = {"Gemm": 0, "FusedGemm": 0, "QGemm": 0}
_MATMUL = {
    "MatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "FusedMatMul",
    "DynamicQuantizeMatMul",
}
_DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}
_FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}

Shape = list  # list[int | None]


def dtype_name(data_type: int) -> str:
    return _DTYPE_NAMES.get(data_type, TensorProto.DataType.Name(data_type).lower())


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Packed size: elements x bit width / 8 (INT4 = half a byte), whatever the proto storage."""
    n = math.prod(t.dims)
    if t.data_type in _FOUR_BIT:
        return (n + 1) // 2
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def bytes_by_dtype(model: onnx.ModelProto) -> dict[str, int]:
    """Packed initializer bytes per element type (INT4 counts half a byte per value)."""
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        name = dtype_name(t.data_type)
        out[name] = out.get(name, 0) + tensor_bytes(t)
    return out


# ---------------------------------------------------------------------------------------- shapes


def _dims(vi: onnx.ValueInfoProto) -> Shape | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _known(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _conv_out(x: Shape, w: Shape, node: onnx.NodeProto, channels_last: bool) -> Shape | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    spatial = x[1:-1] if channels_last else x[2:]
    nd = len(spatial)
    kernel = list(w[2:])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [math.ceil(s / st) for s, st in zip(spatial, strides)]
    else:
        pads = [0] * (2 * nd) if auto == "VALID" else list(attrs.get("pads", [0] * (2 * nd)))
        out = [
            (s + pads[i] + pads[i + nd] - ((k - 1) * d + 1)) // st + 1
            for i, (s, k, st, d) in enumerate(zip(spatial, kernel, strides, dil))
        ]
    return [x[0], *out, w[0]] if channels_last else [x[0], w[0], *out]


def _contrib_shape(node: onnx.NodeProto, shapes: dict[str, Shape]) -> Shape | None:
    """Output shape of a com.microsoft op that onnx's shape inference does not know."""

    def get(i: int) -> Shape | None:
        return shapes.get(node.input[i]) if i < len(node.input) and node.input[i] else None

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    x = get(0)
    if x is None or not _known(x):
        return None
    if op in ("FusedConv", "QLinearConv"):
        w = get(_CONV_W[op])
        return _conv_out(x, w, node, bool(attrs.get("channels_last", 0))) if _known(w) else None
    if op in ("QGemm", "FusedGemm"):
        b = get(3 if op == "QGemm" else 1)
        if not _known(b):
            return None
        m = x[1] if attrs.get("transA", 0) else x[0]
        n = b[0] if attrs.get("transB", 0) else b[1]
        return [m, n]
    if op in ("FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        b = get(1)
        if not _known(b):
            return None
        a = list(x)
        b = list(b)
        if attrs.get("transA", 0):
            a[-2], a[-1] = a[-1], a[-2]
        if attrs.get("transB", 0):
            b[-2], b[-1] = b[-1], b[-2]
        batch = list(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))) if len(a) > 2 or len(b) > 2 else []
        return [*batch, a[-2], b[-1]] if len(b) > 1 else [*batch, a[-2]]
    if op in ("QLinearAdd", "QLinearMul"):
        y = get(3)
        return list(np.broadcast_shapes(tuple(x), tuple(y))) if _known(y) else None
    if op == "QLinearGlobalAveragePool":
        if attrs.get("channels_last", 0):
            return [x[0], *([1] * (len(x) - 2)), x[-1]]
        return [x[0], x[1], *([1] * (len(x) - 2))]
    if op == "QLinearConcat":
        parts = [get(i) for i in range(2, len(node.input), 3)]
        if not all(_known(p) for p in parts):
            return None
        axis = int(attrs["axis"]) % len(parts[0])
        out = list(parts[0])
        out[axis] = sum(p[axis] for p in parts)
        return out
    if op in (
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
    ):
        return list(x)
    return None


# com.microsoft op -> index of the zero point whose type is the output's (quantized outputs).
_OUT_ZP = {
    "QLinearAdd": 7,
    "QLinearMul": 7,
    "QLinearConv": 7,
    "QLinearGlobalAveragePool": 4,
    "QLinearAveragePool": 4,
    "QLinearSigmoid": 4,
    "QLinearLeakyRelu": 4,
    "QLinearSoftmax": 4,
    "QLinearConcat": 1,
    "QGemm": 8,
}


def _contrib_type(node: onnx.NodeProto, types: dict[str, int]) -> int:
    """Element type of a com.microsoft op's output: downstream inference type-checks it."""
    i = _OUT_ZP.get(node.op_type)
    if i is not None:
        name = node.input[i] if i < len(node.input) else ""
        if name:
            return types.get(name, TensorProto.UINT8)
        return TensorProto.FLOAT if node.op_type == "QGemm" else TensorProto.UINT8
    return types.get(node.input[0], TensorProto.FLOAT) if node.input else TensorProto.FLOAT


def onnx_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes from onnx shape inference, re-run after filling in com.microsoft ops by hand."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    shapes: dict[str, Shape] = {t.name: list(t.dims) for t in model.graph.initializer}
    types: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
    for _ in range(len(model.graph.node) + 1):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
            d = _dims(vi)
            if _known(d):
                shapes[vi.name] = d
        added = False
        for node in g.node:
            if node.domain in ("", "ai.onnx") or not node.output or node.output[0] in shapes:
                continue
            out = _contrib_shape(node, shapes)
            if out is not None:
                shapes[node.output[0]] = out
                elem = _contrib_type(node, types)
                types[node.output[0]] = elem
                model.graph.value_info.append(helper.make_tensor_value_info(node.output[0], elem, out))
                added = True
        if not added:
            break
    return shapes


def executed_shapes(model: onnx.ModelProto, feed_shape: list[int]) -> dict[str, Shape]:
    """Shapes observed by running the graph once in onnxruntime with every value as an output."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    declared = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in declared:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
                declared.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    vi = next(v for v in m.graph.input if v.name == inp.name)
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    outs = sess.run(None, {inp.name: np.zeros(feed_shape, dtype=dtype)})
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    shapes.update({o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs)})
    return shapes


# ------------------------------------------------------------------------------------------ MACs


def node_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    """Multiply-accumulates of one node at batch 1; None when a needed shape is unknown."""
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op in _CONV_W:
        w = shapes.get(node.input[_CONV_W[op]])
        if not (_known(out) and _known(w)):
            return None
        return math.prod(out) * math.prod(w[1:])  # out elements x (Cin / groups) x kh x kw
    if op == "ConvTranspose":
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not (_known(x) and _known(w)):
            return None
        return math.prod(x) * math.prod(w[1:])  # in elements x (Cout / groups) x kh x kw
    if op in _GEMM_A:
        a = shapes.get(node.input[0])
        if not (_known(out) and _known(a)):
            return None
        k = a[0] if attrs.get("transA", 0) else a[-1]
        return math.prod(out) * k
    if op in _MATMUL:
        a = shapes.get(node.input[0])
        if not (_known(out) and _known(a)):
            return None
        k = a[-2] if attrs.get("transA", 0) else a[-1]
        return math.prod(out) * k
    return 0


def batch_one(
    model: onnx.ModelProto, input_shape: tuple[int, ...] | None
) -> tuple[onnx.ModelProto, list[int]]:
    """A copy with the input fixed to batch 1 (or `input_shape`) and stale shape annotations removed."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in m.graph.initializer}
    graph_in = [vi for vi in m.graph.input if vi.name not in inits]
    if len(graph_in) != 1:
        raise UsageError(
            f"expected a model with one input, found {len(graph_in)}: {[v.name for v in graph_in]}"
        )
    dims = graph_in[0].type.tensor_type.shape.dim
    if input_shape is not None:
        if len(input_shape) != len(dims):
            raise UsageError(
                f"input_shape {input_shape} has rank {len(input_shape)}, the model input has {len(dims)}"
            )
        fixed = list(input_shape)
    else:
        fixed = [1] + [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
        if any(d < 1 for d in fixed):
            raise UsageError(
                f"model input {graph_in[0].name!r} has symbolic non-batch dims; "
                "pass input_shape to count MACs"
            )
    for d, v in zip(dims, fixed):
        d.Clear()
        d.dim_value = v
    del m.graph.value_info[:]
    for o in m.graph.output:  # a symbolic batch dim in the outputs would clash with the fixed one
        o.type.tensor_type.ClearField("shape")
    return m, fixed
