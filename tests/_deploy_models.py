"""Small real ONNX classifiers for the deploy tests: fp32, QDQ U8S8/S8S8, QOperator, INT4 QDQ.

A tiny residual CNN is trained for a few seconds on scikit-learn's 8x8 digits (so its logits are
well separated, as a deployed model's are), exported with torch.onnx.export, and quantized with
onnxruntime's own quantizer; the INT4 variant rewrites the U8S8 model's int8 weights to packed
INT4 (re-scaled per output channel, biases re-quantized to the new scale).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 [N, 1, 8, 8] in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


class TinyResNet(nn.Module):
    """Conv/BN/ReLU, a residual Add, MaxPool, GlobalAveragePool and Linear: every op class we ship."""

    def __init__(self, in_ch: int = 1, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.body(y))
        y = self.head(self.pool(y))
        return self.fc(torch.flatten(self.gap(y), 1))


def train_digits(steps: int = 150, seed: int = 0) -> nn.Module:
    """TinyResNet fitted to digits with Adam (a few seconds on one thread); eval mode."""
    torch.manual_seed(seed)
    x, y = digits()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = TinyResNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: more threads only contend on the shared 2-core machine
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (128,), generator=g)
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def export_fp32(model: nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    """torch.onnx.export (TorchScript exporter), opset 17, dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            torch.rand(2, *shape),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 64) -> None:
        self._it = iter([{"input": x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def quantize(fp32: Path, out: Path, calib: np.ndarray, *, fmt: str = "qdq", activations: str = "u8") -> Path:
    """onnxruntime.quantization.quantize_static after quant_pre_process; per-channel int8 weights."""
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        _Reader(calib),
        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
        per_channel=True,
        activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def to_int4(qdq: Path, out: Path) -> Path:
    """Rewrite the int8 Conv/Gemm weights of a QDQ model as packed INT4 (opset 21, IR 10).

    Each output channel is re-scaled to max|w| / 7 and rounded into [-8, 7]; the int32 bias is
    re-quantized to the new x_scale * w_scale so the bias DequantizeLinear stays consistent.
    """
    m = onnx.load(str(qdq))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray, dtype: int | None = None) -> None:
        if dtype == TensorProto.INT4:
            import ml_dtypes

            t = numpy_helper.from_array(value.astype(ml_dtypes.int4), name)
        else:
            t = numpy_helper.from_array(value, name)
        inits[name].CopyFrom(t)

    for node in g.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        w_q, w_s, w_zp = w_dq.input[0], w_dq.input[1], w_dq.input[2]
        shape = [-1] + [1] * (arr(w_q).ndim - 1)
        w = arr(w_q).astype(np.float32) * arr(w_s).reshape(shape)
        s4 = np.abs(w).reshape(len(w), -1).max(axis=1) / 7.0
        s4 = np.where(s4 > 0, s4, 1.0).astype(np.float32)
        q4 = np.clip(np.round(w / s4.reshape(shape)), -8, 7).astype(np.int8)
        put(w_q, q4, TensorProto.INT4)
        put(w_s, s4)
        put(w_zp, np.zeros_like(arr(w_zp), dtype=np.int8), TensorProto.INT4)
        if len(node.input) > 2:
            b_dq = producer[node.input[2]]
            b_q, b_s = b_dq.input[0], b_dq.input[1]
            bias = arr(b_q).astype(np.float64) * arr(b_s)
            new_s = (arr(x_dq.input[1]).astype(np.float32) * s4).astype(np.float32)
            put(b_q, np.round(bias / new_s).astype(np.int32))
            put(b_s, new_s)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 21  # DequantizeLinear takes int4 from opset 21
    m.ir_version = 10
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


def build_all(root: Path) -> dict[str, Path]:
    """fp32, qdq_u8s8, qdq_s8s8, qop_u8s8 and qdq_int4 digits models under `root`."""
    x, _ = digits()
    calib = x[:256]
    fp32 = export_fp32(train_digits(), root / "fp32.onnx", (1, 8, 8))
    paths = {"fp32": fp32}
    paths["qdq_u8s8"] = quantize(fp32, root / "qdq_u8s8.onnx", calib, activations="u8")
    paths["qdq_s8s8"] = quantize(fp32, root / "qdq_s8s8.onnx", calib, activations="s8")
    paths["qop_u8s8"] = quantize(fp32, root / "qop_u8s8.onnx", calib, fmt="qop", activations="u8")
    paths["qdq_int4"] = to_int4(paths["qdq_u8s8"], root / "qdq_int4.onnx")
    return paths


def noisy(src: Path, out: Path, sigma: float) -> Path:
    """`src` with Gaussian noise (RandomNormalLike x sigma) added to its input: a stochastic graph."""
    m = onnx.load(str(src))
    g = m.graph
    inp = g.input[0].name
    for node in g.node:
        node.input[:] = ["noisy" if i == inp else i for i in node.input]
    g.initializer.append(numpy_helper.from_array(np.array(sigma, np.float32), "sigma"))
    noise = [helper.make_node("RandomNormalLike", [inp], ["n"], dtype=TensorProto.FLOAT),
             helper.make_node("Mul", ["n", "sigma"], ["n2"]), helper.make_node("Add", [inp, "n2"], ["noisy"])]
    for i, node in enumerate(noise):
        g.node.insert(i, node)
    onnx.save(m, str(out))
    return out
