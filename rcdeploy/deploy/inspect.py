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

import onnx
import onnxruntime as ort
from onnx import TensorProto

from rcdeploy.runtime import u8s8
from rcdeploy.runtime.cpu import cpu_kind
from rcdeploy.runtime.graph import (
    INTEGER_OPS,
    batch_one,
    bytes_by_dtype,
    executed_shapes,
    node_macs,
    onnx_shapes,
)
from rcdeploy.runtime.session import load_model_proto, open_session

__all__ = ["GraphReport", "inspect_model", "INTEGER_OPS"]


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
    optimized, extended = _optimized_graphs(model, target)
    per_node, shapes_from = _per_node_macs(extended, input_shape)
    total = sum(d["macs"] for d in per_node)
    integer = sum(d["macs"] for d in per_node if d["integer"])
    return GraphReport(
        op_histogram=dict(Counter(_op_key(n) for n in model.graph.node)),
        optimized_op_histogram=dict(Counter(_op_key(n) for n in optimized.graph.node)),
        macs_total=total,
        macs_integer=integer,
        integer_mac_share=integer / total if total else 0.0,
        params=sum(math.prod(t.dims) for t in model.graph.initializer),
        bytes_by_dtype=bytes_by_dtype(model),
        file_bytes=_file_bytes(p, model),
        per_node=per_node,
        shapes_from=shapes_from,
        int16_pairs=u8s8.summarize(u8s8.check_graph(optimized)),
        cpu=cpu_kind().to_dict(),
    )


def _optimized_graphs(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """onnxruntime's graph for `target` (what runs) and at ORT_ENABLE_EXTENDED (where MACs are counted)."""
    with tempfile.TemporaryDirectory(prefix="rcdeploy-inspect-") as tmp:
        run_path, mac_path = Path(tmp) / "target.onnx", Path(tmp) / "extended.onnx"
        open_session(model, target=target, optimized_model_path=run_path)
        open_session(model, target=target, optimized_model_path=mac_path,
                     optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        return onnx.load(str(run_path)), onnx.load(str(mac_path))


def _per_node_macs(extended: onnx.ModelProto, input_shape: tuple[int, ...] | None) -> tuple[list[dict], str]:
    """MACs of every node at batch 1, and where the shapes came from (onnx inference or a run)."""
    fixed_model, feed_shape = batch_one(extended, input_shape)
    shapes_from = "onnx"
    try:
        shapes = onnx_shapes(fixed_model)
    except Exception:  # onnx inference can reject graphs onnxruntime accepts; fall back below
        shapes = {}
    nodes = list(fixed_model.graph.node)
    macs = [node_macs(n, shapes) for n in nodes]
    if any(v is None for v in macs):
        shapes_from = "onnxruntime"
        shapes = executed_shapes(fixed_model, feed_shape)
        macs = [node_macs(n, shapes) for n in nodes]
    per_node = [{"name": n.name, "op": _op_key(n), "macs": int(m or 0), "integer": n.op_type in INTEGER_OPS}
                for n, m in zip(nodes, macs)]
    return per_node, shapes_from
