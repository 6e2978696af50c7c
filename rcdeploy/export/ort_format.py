"""ORT format (`.ort`) for onnxruntime mobile / minimal builds, and the operator config of a reduced build.

Same recipe as `python -m onnxruntime.tools.convert_onnx_models_to_ort` (fixed optimization style,
ORT_ENABLE_ALL without the x86-only NCHWc transformer, so the file runs on ARM too), done through
the Python API so nothing is printed and the paths in the config are the shipped names. The .ort file
stores the graph after onnxruntime's optimizations: fused integer kernels (QLinearConv, QLinearAdd,
QGemm...) with int8 weights (rcdeploy's packed INT4 -> Cast -> Mul chains are folded there). A foreign
file whose INT4 weights feed DequantizeLinear directly is widened to INT8 first, or it would be
saved as float Conv.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from rcdeploy.errors import VerificationError


def to_ort_format(model: bytes | onnx.ModelProto, ort_name: str = "model.ort") -> tuple[bytes, str]:
    """(.ort bytes, required-operators config text) for an ONNX model."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    from rcdeploy.runtime.session import widen_low_bit_initializers

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    proto = widen_low_bit_initializers(proto)
    with tempfile.TemporaryDirectory(prefix="rcdeploy-ort-format-") as tmp:
        ort_path = Path(tmp) / ort_name
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(ort_path)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed", "0")  # the converter's default for non-ARM
        so.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])
        config_path = Path(tmp) / "required_operators.config"
        tool_log = logging.getLogger("ort_format_model.utils")  # logs the temp path at INFO
        level = tool_log.level
        tool_log.setLevel(logging.WARNING)
        try:
            create_config_from_models([ort_path], config_path, False)
        finally:
            tool_log.setLevel(level)
        ort_bytes = ort_path.read_bytes()
        config = config_path.read_text().replace(str(ort_path), ort_name)
    return ort_bytes, config


def check_ort_format(ort_bytes: bytes) -> ort.InferenceSession:
    """Load .ort bytes in an InferenceSession (what a mobile app does); failure is a VerificationError."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.load_model_format", "ORT")
    try:
        return ort.InferenceSession(ort_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's pybind exceptions
        raise VerificationError(f"the .ort file does not load in onnxruntime ({str(e).splitlines()[0][:160]}); "
                                "nothing was written") from None
