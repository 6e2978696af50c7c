"""What an ONNX classifier costs and what onnxruntime really runs: ops, MACs, integer share, bytes.

The file's own op list says little about speed: onnxruntime fuses QDQ patterns into integer
kernels (QLinearConv, QGemm, ...) only when their types allow it, and leaves the rest as
dequantize + float op. So MACs and the integer share are counted on the graph onnxruntime
writes after optimizing (SessionOptions.optimized_model_filepath), not on the file.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from rcdeploy.errors import UsageError
from rcdeploy.runtime import u8s8
from rcdeploy.runtime.cpu import cpu_kind
from rcdeploy.runtime.session import load_model_proto, open_session

__all__ = ["GraphReport", "inspect_model", "INTEGER_OPS"]

# Kernels that compute on integers in onnxruntime (the MAC-free ones count as integer nodes too).
INTEGER_OPS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
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
_CONV_W = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> index of its weight
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


@dataclass
class GraphReport:
    """Counts for one ONNX file (see `inspect_model` for what each figure counts)."""

    op_histogram: dict[str, int]
    optimized_op_histogram: dict[str, int]
    macs_total: int
    macs_integer: int
    integer_mac_share: float
    params: int
    bytes_by_dtype: dict[str, int]
    file_bytes: int
    per_node: list[dict] = field(default_factory=list)
    shapes_from: str = "onnx"  # "onnx" shape inference (+ contrib rules) or "onnxruntime" execution
    int16_pairs: dict = field(default_factory=dict)  # rcdeploy.runtime.u8s8.summarize of the graph that runs
    cpu: dict = field(default_factory=dict)  # this machine's CPU kind (rcdeploy.runtime.cpu)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def _dtype_name(data_type: int) -> str:
    return _DTYPE_NAMES.get(data_type, TensorProto.DataType.Name(data_type).lower())


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Packed size: elements x bit width / 8 (INT4 = half a byte), whatever the proto storage."""
    n = math.prod(t.dims)
    if t.data_type in _FOUR_BIT:
        return (n + 1) // 2
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _file_bytes(path: Path, model: onnx.ModelProto) -> int:
    size = path.stat().st_size
    external = {
        entry.value
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return size + sum((path.parent / loc).stat().st_size for loc in external if (path.parent / loc).is_file())


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


def _onnx_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
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


def _executed_shapes(model: onnx.ModelProto, feed_shape: list[int]) -> dict[str, Shape]:
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


def _node_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
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


def _batch_one(
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


def inspect_model(
    path: str | Path, *, target: str = "cpu", input_shape: tuple[int, ...] | None = None
) -> GraphReport:
    """Ops, MACs, integer share, parameters and bytes of the ONNX file at `path`.

    - `op_histogram`: ops in the file; `optimized_op_histogram`: ops onnxruntime runs for
      `target` (its optimized graph, after INT4 widening). Ops outside the default domain are
      keyed `domain:Op`.
    - MACs (batch 1) of Conv / ConvInteger / QLinearConv / FusedConv / ConvTranspose, Gemm /
      QGemm / FusedGemm and the MatMul family, counted on onnxruntime's graph at
      ORT_ENABLE_EXTENDED: every fusion that decides integer vs float kernels happens there,
      while the later layout passes (NCHWc, NHWC) pad channels to SIMD blocks and would count
      padding. Shapes come from onnx shape inference plus hand rules for com.microsoft ops;
      if that leaves a MAC node unknown, from running the graph once (`shapes_from`).
    - `integer_mac_share` = MACs in integer kernels (INTEGER_OPS) / all MACs (0.0 if no MACs).
    - `params`: elements of every initializer in the file (weights and biases, and also the
      scales, zero points and shape constants that quantized graphs carry).
    - `bytes_by_dtype`: packed initializer bytes per element type (INT4 = half a byte each);
      `file_bytes`: the file plus any external data files.
    - `int16_pairs`: the static proof that no 8-bit integer kernel of the graph onnxruntime runs can
      saturate an int16 pair sum on x86 CPUs without VNNI (`rcdeploy.runtime.u8s8`), naming the kernels
      that can; `cpu`: this machine's kind, which decides whether they do here.
    """
    p = Path(path)
    model = load_model_proto(p)
    op_hist = dict(Counter(_op_key(n) for n in model.graph.node))
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    by_dtype: Counter[str] = Counter()
    for t in model.graph.initializer:
        by_dtype[_dtype_name(t.data_type)] += _tensor_bytes(t)

    with tempfile.TemporaryDirectory(prefix="rcdeploy-inspect-") as tmp:
        run_path, mac_path = Path(tmp) / "target.onnx", Path(tmp) / "extended.onnx"
        open_session(model, target=target, optimized_model_path=run_path)
        open_session(
            model,
            target=target,
            optimized_model_path=mac_path,
            optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        )
        optimized = onnx.load(str(run_path))
        extended = onnx.load(str(mac_path))

    opt_hist = dict(Counter(_op_key(n) for n in optimized.graph.node))
    fixed_model, feed_shape = _batch_one(extended, input_shape)
    shapes_from = "onnx"
    try:
        shapes = _onnx_shapes(fixed_model)
    except Exception:  # onnx inference can reject graphs onnxruntime accepts; fall back below
        shapes = {}
    nodes = list(fixed_model.graph.node)
    macs = [_node_macs(n, shapes) for n in nodes]
    if any(v is None for v in macs):
        shapes_from = "onnxruntime"
        shapes = _executed_shapes(fixed_model, feed_shape)
        macs = [_node_macs(n, shapes) for n in nodes]

    per_node = [
        {"name": n.name, "op": _op_key(n), "macs": int(m or 0), "integer": n.op_type in INTEGER_OPS}
        for n, m in zip(nodes, macs)
    ]
    total = sum(d["macs"] for d in per_node)
    integer = sum(d["macs"] for d in per_node if d["integer"])
    return GraphReport(
        op_histogram=op_hist,
        optimized_op_histogram=opt_hist,
        macs_total=total,
        macs_integer=integer,
        integer_mac_share=integer / total if total else 0.0,
        params=params,
        bytes_by_dtype=dict(by_dtype),
        file_bytes=_file_bytes(p, model),
        per_node=per_node,
        shapes_from=shapes_from,
        int16_pairs=u8s8.summarize(u8s8.check_graph(optimized)),
        cpu=cpu_kind().to_dict(),
    )
