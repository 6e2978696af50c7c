"""onnxruntime sessions for any ONNX classifier: target profiles, INT4 widening, batched logits.

Every deploy measurement (accuracy, robustness, latency) goes through `open_session`, so the
session that is scored is configured the same way everywhere: CPU execution provider only, a
named target profile for threads and graph optimization, and packed INT4 weights widened to
INT8 in memory so that onnxruntime fuses the QDQ pattern into its integer kernels.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from rcdeploy.errors import UsageError
from rcdeploy.names import RUNTIMES as RUNTIME_NAMES
from rcdeploy.names import TARGETS as TARGET_NAMES

__all__ = [
    "CPU",
    "MOBILE",
    "RUNTIMES",
    "TARGETS",
    "check_runtime",
    "TargetProfile",
    "get_target",
    "input_spec",
    "load_model_proto",
    "open_runtime_session",
    "open_session",
    "optimized_graph",
    "run_logits",
    "widen_low_bit_initializers",
]


@dataclass(frozen=True)
class TargetProfile:
    """How a session is configured for one deployment target.

    `threads=None` means `os.cpu_count()` read when the session is opened (not at import), so
    a profile follows the machine it runs on.
    """

    name: str
    threads: int | None
    execution_mode: ort.ExecutionMode
    optimization: ort.GraphOptimizationLevel
    batch_size: int  # batch a latency measurement on this target uses
    description: str

    def intra_op_threads(self) -> int:
        return self.threads if self.threads is not None else (os.cpu_count() or 1)


# Both profiles run ORT_SEQUENTIAL: ORT_PARALLEL only overlaps independent graph branches, and a
# classifier is a chain; what spreads a conv over cores is the intra-op thread pool.
CPU = TargetProfile(
    name="cpu",
    threads=None,
    execution_mode=ort.ExecutionMode.ORT_SEQUENTIAL,
    optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    batch_size=32,
    description="server/desktop CPU: intra-op threads = os.cpu_count(), batched, all graph optimizations",
)
MOBILE = TargetProfile(
    name="mobile",
    threads=1,
    execution_mode=ort.ExecutionMode.ORT_SEQUENTIAL,
    optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    batch_size=1,
    description="one phone-class core: 1 thread, sequential execution, batch 1",
)
# The profiles by name; the names are declared (with the CLI's help words) in rcdeploy.names.TARGETS.
TARGETS: dict[str, TargetProfile] = {p.name: TARGET_NAMES.register(p.name)(p) for p in (CPU, MOBILE)}

# Runtimes a deployed file can be scored and timed in (OpenVINO is an optional extra): rcdeploy.names.RUNTIMES.
RUNTIMES = tuple(RUNTIME_NAMES.names())

# 4-bit element types and the 8-bit type that holds the same values.
_WIDER = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
_WIDER_NP = {TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}


def get_target(target: str) -> TargetProfile:
    """The profile named `target`; unknown names list the known ones."""
    try:
        return TARGETS[target]
    except KeyError:
        raise UsageError(f"unknown target {target!r}; known: {', '.join(sorted(TARGETS))}") from None


def load_model_proto(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file (external data included); any file that is not one is a UsageError."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file {str(p)!r} does not exist; pass the path of an .onnx file")
    if not p.is_file():
        raise UsageError(f"model path {str(p)!r} is not a file; pass the path of an .onnx file")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...: all mean "not usable ONNX"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{str(p)!r} is not a readable ONNX model ({first}); export it again") from None
    # An empty or foreign file can parse as an empty ModelProto (protobuf accepts it): reject it.
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise UsageError(f"{str(p)!r} is not an ONNX model (no graph nodes or outputs); export it again")
    return model


def _coerce_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        return load_model_proto(model)
    raise UsageError(f"expected a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")


def widen_low_bit_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with INT4/UINT4 DequantizeLinear initializers stored as INT8/UINT8.

    Values are preserved exactly; only the storage type changes. onnxruntime does not fuse an
    int4 DequantizeLinear + Conv into QLinearConv (it dequantizes and runs a float Conv); with
    8-bit storage it does. Widened: 4-bit initializers whose every consumer is a
    DequantizeLinear, together with the zero points they share a node with. A 4-bit zero point
    also read by a QuantizeLinear stays 4-bit: widening it would change that node's saturation
    range. Returns `model` itself, uncopied, when nothing needs widening.
    """
    graph = model.graph
    low = {t.name for t in graph.initializer if t.data_type in _WIDER}
    if not low:
        return model
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # A DequantizeLinear's data and zero point must keep one type, so names linked through a DQ
    # form a group that is widened together or not at all.
    group = {name: {name} for name in low}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
            a, b = node.input[0], node.input[2]
            if a in group and b in group and group[a] is not group[b]:
                merged = group[a] | group[b]
                for name in merged:
                    group[name] = merged
            elif (a in low) != (b in low):
                low.discard(a)
                low.discard(b)

    def only_dq(name: str) -> bool:
        users = consumers.get(name, [])
        return bool(users) and all(
            u.op_type == "DequantizeLinear" and u.domain in ("", "ai.onnx") for u in users
        )

    widen = {name for name in low if all(m in low and only_dq(m) for m in group[name])}
    if not widen:
        return model

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name in widen:
            values = numpy_helper.to_array(t).astype(_WIDER_NP[t.data_type])
            wide = numpy_helper.from_array(values, t.name)
            out.graph.initializer[i].CopyFrom(wide)
    # Declared types of the same names (graph inputs in old IR, value_info) must follow.
    for vi in list(out.graph.input) + list(out.graph.value_info):
        if vi.name in widen and vi.type.tensor_type.elem_type in _WIDER:
            vi.type.tensor_type.elem_type = _WIDER[vi.type.tensor_type.elem_type]
    return out


def open_session(
    model: str | Path | onnx.ModelProto,
    *,
    target: str = "cpu",
    threads: int | None = None,
    optimized_model_path: str | Path | None = None,
    widen: bool = True,
    optimization: ort.GraphOptimizationLevel | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for `model`, configured by the `target` profile.

    `threads` overrides the profile's intra-op thread count; `optimization` its graph
    optimization level. With `optimized_model_path`, onnxruntime writes the graph it actually
    runs there (fused kernels, layout changes), which is how `inspect` sees what executes.
    `widen=True` widens packed INT4/UINT4 weights to 8 bits first (see
    `widen_low_bit_initializers`).
    """
    profile = get_target(target)
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    proto = _coerce_model(model)
    if widen:
        proto = widen_low_bit_initializers(proto)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads if threads is not None else profile.intra_op_threads()
    so.inter_op_num_threads = 1  # sequential execution: an inter-op pool would only idle
    so.execution_mode = profile.execution_mode
    so.graph_optimization_level = optimization if optimization is not None else profile.optimization
    # ORT warns on every save of an NCHWc-optimized graph; the CLI owns what reaches the terminal.
    so.log_severity_level = 3
    if optimized_model_path is not None:
        Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = str(model) if isinstance(model, (str, Path)) else "the model"
        raise UsageError(f"onnxruntime cannot load {name}: {first}") from None


def check_runtime(runtime: str) -> str:
    """The runtime's canonical name; unknown names are a UsageError listing the known ones."""
    name = str(runtime).strip().lower()
    if name not in RUNTIMES:
        raise UsageError(f"unknown --runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    return name


def open_runtime_session(model: str | Path | onnx.ModelProto, *, runtime: str = "onnxruntime", target: str = "cpu",
                         threads: int | None = None) -> Any:
    """A session of `runtime` for `model` with onnxruntime's run/get_inputs/get_outputs API.

    onnxruntime: `open_session`. openvino: `rcdeploy.runtime.ov_session.OpenVinoSession`, with the
    target profile's threads; it reads the file as it is (no INT4 widening: what an OpenVINO user gets).
    """
    name = check_runtime(runtime)
    if name == "onnxruntime":
        return open_session(model, target=target, threads=threads)
    from rcdeploy.runtime.ov_session import OpenVinoSession

    profile = get_target(target)
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    source = model if isinstance(model, onnx.ModelProto) else Path(model)
    if not isinstance(source, onnx.ModelProto):
        load_model_proto(source)  # the same checks and messages as onnxruntime's path
    return OpenVinoSession(source, threads=threads or profile.intra_op_threads())


def input_spec(session: ort.InferenceSession) -> tuple[str, list]:
    """Name and shape of the session's (first) input; symbolic dims stay strings or None."""
    first = session.get_inputs()[0]
    return first.name, list(first.shape)


def _check_input(session: ort.InferenceSession, x: np.ndarray) -> str:
    name, shape = input_spec(session)
    if x.ndim != len(shape) or any(
        isinstance(d, int) and d > 0 and d != got for d, got in zip(shape[1:], x.shape[1:])
    ):
        raise UsageError(
            f"input of shape {list(x.shape)} does not fit model input {name!r} of shape {shape}; "
            "check the dataset and its resolution"
        )
    return name


def run_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (first output, float32) for `x`, computed `batch_size` rows at a time."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    name = _check_input(session, x)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    dims = input_spec(session)[1]
    fixed = isinstance(dims[0], int) and dims[0] > 0
    if fixed:
        batch_size = dims[0]  # a model exported with a fixed batch takes exactly that many rows
    output = session.get_outputs()[0].name
    parts = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        rows = len(chunk)
        if fixed and rows < batch_size:  # pad the last chunk of a fixed-batch model, drop the padding after
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *x.shape[1:]), np.float32)])
        parts.append(session.run([output], {name: chunk})[0][:rows])
    if not parts:
        n_out = session.get_outputs()[0].shape[-1]
        return np.zeros((0, n_out if isinstance(n_out, int) else 0), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def optimized_graph(model: bytes | onnx.ModelProto, *, widen: bool = True) -> onnx.ModelProto:
    """The graph onnxruntime actually runs (ORT_ENABLE_ALL, CPU), read back from `optimized_model_filepath`."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    with tempfile.TemporaryDirectory(prefix="rcdeploy-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        open_session(proto, threads=1, optimized_model_path=path, widen=widen)
        return onnx.load(str(path))
