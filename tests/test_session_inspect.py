"""onnxruntime sessions (target profiles, INT4 widening, batched logits) and graph inspection.

Real files only: the digits CNN exported by torch and quantized by onnxruntime's quantizer
(see _deploy_models.py); every figure comes from a real onnxruntime session or its optimized graph.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _deploy_models import build_all, digits
from onnx import TensorProto, numpy_helper

from rcdeploy.deploy.inspect import inspect_model
from rcdeploy.errors import UsageError
from rcdeploy.runtime.session import (
    TARGETS,
    input_spec,
    load_model_proto,
    open_session,
    run_logits,
    widen_low_bit_initializers,
)

# Hand count for TinyResNet on 1x8x8 (width 16), batch 1: output elements x Cin x kh x kw.
HAND_MACS = (
    16 * 8 * 8 * 1 * 3 * 3  # stem conv 1->16 at 8x8
    + 16 * 8 * 8 * 16 * 3 * 3  # body conv 16->16 at 8x8
    + 32 * 4 * 4 * 16 * 3 * 3  # head conv 16->32 at 4x4 (after MaxPool 2)
    + 10 * 32  # linear 32->10
)
# Initializer elements of the fp32 export: BatchNorm folded into the convs (each gains a bias).
HAND_PARAMS = (16 * 9 + 16) + (16 * 16 * 9 + 16) + (32 * 16 * 9 + 32) + (10 * 32 + 10)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_all(tmp_path_factory.mktemp("session_models"))


def histogram_of(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_target_profiles_set_threads(models: dict) -> None:
    cpu = open_session(models["fp32"], target="cpu").get_session_options()
    assert cpu.intra_op_num_threads == os.cpu_count()
    assert cpu.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    mobile = open_session(models["fp32"], target="mobile").get_session_options()
    assert mobile.intra_op_num_threads == 1
    assert mobile.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert TARGETS["mobile"].batch_size == 1
    assert (
        open_session(models["fp32"], target="mobile", threads=2).get_session_options().intra_op_num_threads
        == 2
    )
    with pytest.raises(UsageError, match="known: cpu, mobile"):
        open_session(models["fp32"], target="phone")


def test_optimized_graph_shows_integer_kernels(models: dict, tmp_path) -> None:
    u8 = tmp_path / "u8.opt.onnx"
    open_session(models["qdq_u8s8"], optimized_model_path=u8)
    assert histogram_of(u8).get("QLinearConv", 0) == 3

    widened, raw = tmp_path / "int4_widened.opt.onnx", tmp_path / "int4_raw.opt.onnx"
    open_session(models["qdq_int4"], optimized_model_path=widened)
    open_session(models["qdq_int4"], optimized_model_path=raw, widen=False)
    assert histogram_of(widened).get("QLinearConv", 0) == 3
    # What onnxruntime does with int4 weights left as they are: DequantizeLinear + float Conv.
    h = histogram_of(raw)
    assert h.get("QLinearConv", 0) == 0
    assert h.get("Conv", 0) == 3 and h.get("DequantizeLinear", 0) >= 3


def test_widening_preserves_values_and_logits(models: dict) -> None:
    m = load_model_proto(models["qdq_int4"])
    w = widen_low_bit_initializers(m)
    before = {t.name: t for t in m.graph.initializer}
    after = {t.name: t for t in w.graph.initializer}
    low = [n for n, t in before.items() if t.data_type == TensorProto.INT4]
    assert len(low) == 8  # 4 weights + their 4 zero points
    assert all(after[n].data_type == TensorProto.INT8 for n in low)
    for n in low:
        np.testing.assert_array_equal(
            numpy_helper.to_array(after[n]), numpy_helper.to_array(before[n]).astype(np.int8)
        )
    assert m.graph.initializer[0] is not w.graph.initializer[0]  # a copy: the input is untouched
    assert any(t.data_type == TensorProto.INT4 for t in m.graph.initializer)
    plain = load_model_proto(models["qdq_u8s8"])
    assert widen_low_bit_initializers(plain) is plain  # nothing to widen

    x = digits()[0][:200]
    fused = run_logits(open_session(m), x)
    unfused = run_logits(open_session(m, widen=False), x)
    assert (fused.argmax(1) == unfused.argmax(1)).mean() >= 0.99
    scale = 0.0
    for n in m.graph.node:
        if n.output[0] == m.graph.output[0].name:
            scale = float(numpy_helper.to_array(before[n.input[1]]))
    assert np.abs(fused - unfused).max() <= 3 * scale


def test_run_logits_batches_and_checks_shape(models: dict) -> None:
    # The INT4 model: exact on every CPU (the U8S8 one saturates on x86 without VNNI, where its accuracy drops).
    session = open_session(models["qdq_int4"])
    name, shape = input_spec(session)
    assert name == "input" and shape[1:] == [1, 8, 8] and not isinstance(shape[0], int)
    x, y = digits()
    whole = run_logits(session, x[:100])
    assert whole.dtype == np.float32 and whole.shape == (100, 10)
    np.testing.assert_array_equal(run_logits(session, x[:100], batch_size=7), whole)
    assert (whole.argmax(1) == y[:100]).mean() > 0.9
    with pytest.raises(UsageError, match="does not fit model input"):
        run_logits(session, np.zeros((4, 3, 8, 8), np.float32))


def test_inspect_counts_macs_params_and_integer_share(models: dict) -> None:
    fp32 = inspect_model(models["fp32"])
    assert fp32.macs_total == HAND_MACS
    assert fp32.macs_integer == 0 and fp32.integer_mac_share == 0.0
    assert fp32.params == HAND_PARAMS
    assert fp32.bytes_by_dtype == {"float32": 4 * HAND_PARAMS}
    assert fp32.file_bytes == models["fp32"].stat().st_size
    assert fp32.op_histogram["Conv"] == 3
    assert fp32.shapes_from == "onnx"
    assert sum(d["macs"] for d in fp32.per_node) == HAND_MACS

    u8 = inspect_model(models["qdq_u8s8"])
    assert u8.macs_total == HAND_MACS
    assert u8.integer_mac_share == 1.0
    assert u8.op_histogram["QuantizeLinear"] >= 1 and "QLinearConv" not in u8.op_histogram
    assert any(k.endswith("QLinearConv") for k in u8.optimized_op_histogram)
    assert u8.shapes_from == "onnx"  # the contrib-op shape rules covered QLinearAdd / QGemm / ...

    qop = inspect_model(models["qop_u8s8"])
    assert qop.macs_total == HAND_MACS and qop.integer_mac_share == 1.0

    int4 = inspect_model(models["qdq_int4"])
    assert int4.macs_total == HAND_MACS and int4.integer_mac_share == 1.0
    # Same weights, half the bytes: 4 weight and 4 zero-point tensors, each packed to ceil(n / 2).
    assert "int8" not in int4.bytes_by_dtype
    assert abs(2 * int4.bytes_by_dtype["int4"] - u8.bytes_by_dtype["int8"]) <= 8
    assert int4.file_bytes < u8.file_bytes


def test_inspect_mobile_target_and_s8s8(models: dict) -> None:
    report = inspect_model(models["qdq_s8s8"], target="mobile")
    assert report.macs_total == HAND_MACS
    integer_nodes = [d for d in report.per_node if d["integer"] and d["macs"]]
    assert report.macs_integer == sum(d["macs"] for d in integer_nodes)
    assert 0.0 < report.integer_mac_share <= 1.0


def test_bad_files_are_usage_errors(models: dict, tmp_path) -> None:
    text = tmp_path / "model.onnx"
    text.write_text("definitely not protobuf " * 50)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bad in (text, empty):
            with pytest.raises(UsageError, match=bad.name):
                load_model_proto(bad)
            with pytest.raises(UsageError):
                open_session(bad)
            with pytest.raises(UsageError):
                inspect_model(bad)
    with pytest.raises(UsageError, match="does not exist"):
        open_session(tmp_path / "nope.onnx")
    with pytest.raises(UsageError, match="not a file"):
        inspect_model(tmp_path)
    with pytest.raises(UsageError, match="threads"):
        open_session(models["fp32"], threads=0)
