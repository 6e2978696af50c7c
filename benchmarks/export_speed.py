"""Speed and size of rcdeploy's integer ONNX vs fp32 ONNX of the same ResNet-20, in onnxruntime on this CPU.

    .venv/bin/python benchmarks/export_speed.py [--rounds 5] [--json FILE]

Models (CIFAR ResNet-20, 3x32x32, full width; weights and BN statistics randomized, activations
calibrated on random images: latency and size do not depend on training):
  fp32            torch.onnx.export of the float network (Brevitas layers with quantization off; the
                  exporter folds BatchNorm into Conv), dynamic batch
  int8            rcdeploy.export.qdq.build_qdq, 8-bit weights and activations
  int4 packed     4-bit weights (first/last layers 8-bit) stored as packed INT4 -> Cast -> Mul -> DQ
  int4 int8-stor  the same values stored as INT8 (storage="int8")
  int4 naive      reference only: the same INT4 initializers read by DequantizeLinear directly (the
                  form onnxruntime does not fuse); same function, float Conv kernels
  ort quantize_static  peer: onnxruntime's own PTQ of the fp32 file, fast form (quant_pre_process, U8S8
                  QDQ, per-tensor), i.e. what a user gets without rcdeploy (no QAT, no robustness)
Every model runs in a plain onnxruntime InferenceSession (CPU provider, ORT_ENABLE_ALL, sequential).
Latency: median of all timed runs, measured round-robin over the models in several rounds so that load
from other processes hits all models alike. Ratios are fp32 latency / model latency in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper

from rcdeploy.export.qdq import build_qdq
from rcdeploy.models import create_model
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec

SHAPE = (3, 32, 32)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# name, batch, intra-op threads, thread-pool spinning, runs per round. Spinning is onnxruntime's default;
# on a shared, oversubscribed machine spinning workers lose their slices to other processes, so the
# b64 setting is also measured with spinning off (same settings for every model in a row).
SETTINGS = (("b1/1t", 1, 1, True, 100), ("b64/2t", 64, 2, True, 8), ("b64/2t nospin", 64, 2, False, 8))


def make_model(bits: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    float_model = bits == 32
    quant = QuantSpec(bits=bits, act_bits=32 if float_model else 8, first_last_bits=None if float_model else 8)
    model = create_model("resnet20", num_classes=10, in_chans=3, mean=MEAN, std=STD, quant=quant, input_size=32)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    if not float_model:
        calibrate_activations(model, [torch.rand(64, *SHAPE, generator=gen) for _ in range(2)])
    return model.eval()


def fp32_onnx(model: torch.nn.Module) -> bytes:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "fp32.onnx"
        torch.onnx.export(model, (torch.rand(1, *SHAPE),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        return path.read_bytes()


def ort_quantize_static(fp32: bytes) -> bytes:
    """Peer: onnxruntime's own post-training quantizer in its fast form (quant_pre_process, U8S8 QDQ)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            gen = np.random.default_rng(0)
            self.batches = iter([{"input": gen.random((16, *SHAPE), dtype=np.float32)} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "q.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def naive_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """INT4 -> Cast -> Mul(k) -> DQ(s/k) rewritten as INT4 -> DQ(s): the same real weights, unfused form."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producer = {n.output[0]: n for n in g.node}
    drop = set()
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in producer:
            continue
        src, k = producer[node.input[0]], 1
        if src.op_type == "Mul":
            k = int(numpy_helper.to_array(inits[src.input[1]]))
            drop.add(id(src))
            src = producer[src.input[0]]
        if src.op_type != "Cast" or inits.get(src.input[0]) is None:
            continue
        if inits[src.input[0]].data_type != TensorProto.INT4:
            continue
        drop.add(id(src))
        node.input[0] = src.input[0]
        scale = inits[node.input[1]]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(k), scale.name))
        if len(node.input) > 2:  # an int8 zero point must become int4 like its data
            zp = inits[node.input[2]]
            zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp).astype("int4"), zp.name))
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return out


def session(data: bytes, threads: int, spin: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the figures as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    fp32 = fp32_onnx(make_model(32))
    int8 = build_qdq(make_model(8), SHAPE).to_bytes()
    m4 = make_model(4)
    int4 = build_qdq(m4, SHAPE, storage="packed")
    int4_wide = build_qdq(m4, SHAPE, storage="int8").to_bytes()
    models = {"fp32": fp32, "int8": int8, "int4 packed": int4.to_bytes(), "int4 int8-stored": int4_wide,
              "int4 naive (ref)": naive_int4(int4.model).SerializeToString(),
              "ort quantize_static": ort_quantize_static(fp32)}

    rng = np.random.default_rng(0)
    results: dict = {"onnxruntime": ort.__version__, "sizes": {k: len(v) for k, v in models.items()}, "latency_ms": {}}
    for setting, batch, threads, spin, runs in SETTINGS:
        x = rng.random((batch, *SHAPE), dtype=np.float32)
        sessions = {k: session(v, threads, spin) for k, v in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for s in sessions.values():  # warm-up
            for _ in range(3):
                s.run(None, {"input": x})
        for _ in range(args.rounds):
            for name, s in sessions.items():
                for _ in range(runs):
                    t0 = time.perf_counter()
                    s.run(None, {"input": x})
                    times[name].append(time.perf_counter() - t0)
        results["latency_ms"][setting] = {k: 1000 * statistics.median(v) for k, v in times.items()}

    lat = results["latency_ms"]
    names = list(models)
    header = f"{'model':<21}{'bytes':>10}{'size/fp32':>10}" + "".join(
        f"{s + ' ms':>17}{'x fp32':>8}" for s, *_ in SETTINGS)
    print(f"ResNet-20 3x32x32, onnxruntime {ort.__version__}, CPU EP, median latency ({args.rounds} rounds)")
    print(header)
    for name in names:
        row = f"{name:<21}{results['sizes'][name]:>10,}{results['sizes'][name] / results['sizes']['fp32']:>10.3f}"
        for s, *_ in SETTINGS:
            row += f"{lat[s][name]:>17.3f}{lat[s]['fp32'] / lat[s][name]:>7.2f}x"
        print(row)
    print(f"int4 packed / int8 file size: {results['sizes']['int4 packed'] / results['sizes']['int8']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
