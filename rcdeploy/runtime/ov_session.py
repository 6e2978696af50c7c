"""OpenVINO behind the slice of onnxruntime's InferenceSession API that rcdeploy uses.

OpenVINO reads ONNX QDQ files directly and is the runtime many x86 users pick. Which convolutions it
runs as int8 depends on the weight form (measured with openvino 2026.4: int8 initializers, or INT4 ->
Cast(int8), read by DequantizeLinear run as int8 kernels; a Mul of the int8 weights or uint8 weights
run in float), so `int8_layers` reports it from the compiled model's runtime graph, where
`primitiveType` names the kernel that runs (e.g. `brgconv_avx512_I8` vs `brgconv_avx512_f32`).

Precision hint f32: on CPUs with bf16 OpenVINO's default runs float layers in bf16, which would make
the fp32 peer and every float layer something other than what the file says.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rcdeploy.errors import UsageError

__all__ = ["OpenVinoSession", "openvino_version"]

_MAC_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


@dataclass(frozen=True)
class _Arg:
    name: str
    shape: list


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise UsageError("--runtime openvino needs OpenVINO: pip install 'rcdeploy[openvino]' (or pip install "
                         "openvino)") from None
    return openvino


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.get_version())


class OpenVinoSession:
    """A compiled OpenVINO CPU model: `get_inputs()`, `get_outputs()`, `run(outputs, feed)` as onnxruntime."""

    def __init__(self, model: str | Path | onnx.ModelProto, *, threads: int | None = None) -> None:
        ov = _ov()
        self.threads = int(threads or os.cpu_count() or 1)
        core = ov.Core()
        try:
            if isinstance(model, onnx.ModelProto):
                with tempfile.TemporaryDirectory(prefix="rcdeploy-ov-") as tmp:
                    path = Path(tmp) / "model.onnx"
                    path.write_bytes(model.SerializeToString())
                    read = core.read_model(str(path))
            else:
                read = core.read_model(str(model))
            config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
                      "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
            self._compiled = core.compile_model(read, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line text
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"OpenVINO cannot load the model: {first[:300]}") from None
        self._request = self._compiled.create_infer_request()
        self._inputs = [_Arg(p.get_any_name(), [d.get_length() if d.is_static else "batch"
                                                for d in p.get_partial_shape()]) for p in self._compiled.inputs]
        self._outputs = [_Arg(p.get_any_name(), []) for p in self._compiled.outputs]

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer({name: np.ascontiguousarray(x) for name, x in feed.items()})
        names = output_names or [o.name for o in self._outputs]
        index = {o.name: i for i, o in enumerate(self._outputs)}
        return [np.array(results[self._compiled.outputs[index[n]]]) for n in names]

    def int8_layers(self) -> dict[str, Any]:
        """Conv / matmul layers of the runtime graph and which of them run int8 kernels (call after a run:
        with a dynamic batch the kernels are chosen at the first inference)."""
        layers = []
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            kind = rt["layerType"].astype(str) if "layerType" in rt else ""
            if kind not in _MAC_LAYERS:
                continue
            kernel = rt["primitiveType"].astype(str) if "primitiveType" in rt else ""
            layers.append({"layer": rt["originalLayersNames"].astype(str) if "originalLayersNames" in rt else "",
                           "type": kind, "kernel": kernel,
                           "int8": kernel.lower().endswith(("_i8", "_u8"))})
        return {"layers": len(layers), "int8": sum(r["int8"] for r in layers),
                "float": [r["layer"] for r in layers if not r["int8"]], "kernels": sorted({r["kernel"] for r in layers})}
