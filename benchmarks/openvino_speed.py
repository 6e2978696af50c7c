"""ResNet-20 in OpenVINO and onnxruntime: which weight forms each runs as integer kernels, and how fast.

    python benchmarks/openvino_speed.py [--quick] [--rounds 5]

The same ResNet-20 (CIFAR shape, random weights, calibrated activations) in these forms, each timed in
both runtimes, candidates interleaved round-robin per runtime and setting; the figure is the median over
rounds of the per-round ratio (that runtime's fp32) / (form), so >1 is faster than fp32 in the same
runtime:

  fp32                      torch.onnx.export of the float network
  ort qs U8S8 rr            onnxruntime quantize_static, U8S8 QDQ, reduce_range=True (the peer: 7-bit weights)
  ort qs U8S8               the same without reduce_range (8-bit weights: can saturate on x86 without VNNI)
  rcdeploy w4 (packed)      `rcdeploy export` default: INT4 -> Cast -> Mul -> DequantizeLinear, 8-bit first/last
                            layers as uint8
  rcdeploy w4 (openvino)    `rcdeploy export --runtime openvino`: int8 storage, 8-bit first/last layers uint8
  rcdeploy w4 fl7 (openvino) the same with first and last layers trained at 7 bits (--first-last-bits 7)

Columns: `exact w/o VNNI` (rcdeploy's static int16 pair proof on onnxruntime's optimized graph: the file
computes the same on x86 with and without VNNI; OpenVINO's int8 kernels saturate the same pairs, measured
under qemu -cpu Haswell), `OV int8`: conv/matmul layers OpenVINO runs as int8 kernels (primitiveType).
OpenVINO runs with INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY, NUM_STREAMS 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import inference  # noqa: E402

SETTINGS = (("b1/1t", 1, 1), ("b64/1t", 64, 1), ("b64/all", 64, None))
PEER = "ort qs U8S8 rr"
OURS = "rcdeploy w4 fl7 (openvino)"


def build(log: Any) -> list[tuple[str, bytes]]:
    from rcdeploy.export.qdq import build_qdq

    shape = inference.NETS["resnet20"]["shape"]
    fp32 = inference.fp32_onnx(inference.make_model("resnet20", 32), shape)
    cands = [("fp32", fp32),
             (PEER, inference.ort_quantize_static(fp32, shape, best=True, reduce_range=True)),
             ("ort qs U8S8", inference.ort_quantize_static(fp32, shape, best=True))]
    w4 = inference.make_model("resnet20", 4)
    cands.append(("rcdeploy w4 (packed)", build_qdq(w4, shape, storage="packed").to_bytes()))
    cands.append(("rcdeploy w4 (openvino)", build_qdq(w4, shape, storage="int8").to_bytes()))
    fl7 = inference.make_model("resnet20", 4, first_last_bits=7)
    cands.append((OURS, build_qdq(fl7, shape, storage="int8").to_bytes()))
    log(f"  built {len(cands)} forms")
    return cands


def ov_session(data: bytes, threads: int) -> Any:
    import onnx

    from rcdeploy.runtime.ov_session import OpenVinoSession

    return OpenVinoSession(onnx.load_from_string(data), threads=threads)


def runner(session: Any, x: np.ndarray) -> Any:
    name = session.get_inputs()[0].name
    out = session.get_outputs()[0].name
    return lambda: session.run([out], {name: x})


def run(rounds: int, budget_s: float, write: bool, quick: bool) -> int:
    from rcdeploy.export.verify import saturation_report
    from rcdeploy.runtime.ov_session import openvino_version
    from rcdeploy.runtime.session import optimized_graph

    if openvino_version() is None:
        print("openvino is not installed (pip install 'rcdeploy[openvino]'): nothing to measure", file=sys.stderr)
        return 0
    info = common.machine_info()
    info["openvino"] = openvino_version()
    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    log("[openvino] resnet20")
    cands = build(log)
    shape = inference.NETS["resnet20"]["shape"]
    exact = {n: bool(saturation_report(optimized_graph(d))["saturation_free"]) for n, d in cands}
    x1 = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    int8 = {}
    for n, d in cands:
        s = ov_session(d, 1)
        runner(s, x1)()
        int8[n] = s.int8_layers()
    res: dict[str, Any] = {}
    for label, batch, threads in SETTINGS:
        nthreads = threads or cpus
        x = np.random.default_rng(1).random((batch, *shape), dtype=np.float32)
        res[label] = {}
        for rt in ("onnxruntime", "openvino"):
            fns = {n: runner(common.ort_session(d, nthreads) if rt == "onnxruntime" else ov_session(d, nthreads), x)
                   for n, d in cands}
            runs = {n: inference.runs_for(f, budget_s) for n, f in fns.items()}
            times = common.interleave(fns, rounds=rounds, runs=runs, warmup=1)
            res[label][rt] = {n: {"latency": times[n].summary(),
                                  "speedup_vs_fp32": common.round_ratio(times["fp32"], times[n])} for n in fns}
            log(f"  {label} {rt}: {rounds} rounds")
    headers = ["form", "exact w/o VNNI", "OV int8", "bytes"]
    for label, *_ in SETTINGS:
        headers += [f"{label} ORT", f"{label} OV"]
    rows = []
    for n, d in cands:
        row = [n, "yes" if exact[n] else "**no**", f"{int8[n]['int8']}/{int8[n]['layers']}", f"{len(d):,}"]
        for label, *_ in SETTINGS:
            for rt in ("onnxruntime", "openvino"):
                row.append(inference._x(res[label][rt][n]["speedup_vs_fp32"]["median"]))
        rows.append(row)
    print(common.text_table(headers, rows))
    goal = {label: (res[label]["openvino"][OURS]["speedup_vs_fp32"]["median"],
                    res[label]["openvino"][PEER]["speedup_vs_fp32"]["median"]) for label, *_ in SETTINGS}
    lines = [f"{label}: {OURS} {a:.2f}x vs the peer's {b:.2f}x in OpenVINO ({'met' if a >= b else 'MISSED'})"
             for label, (a, b) in goal.items()]
    for line in lines:
        print("goal (reported, not asserted): " + line)
    if write:
        md = ["## OpenVINO and onnxruntime: weight forms of ResNet-20 (3x32x32)", "",
              f"Machine: {common.machine_line(info)}; openvino {info['openvino']}. `python benchmarks/openvino_speed.py` "
              f"({rounds} round-robin rounds per runtime and setting{'; QUICK smoke run, not for quoting' if quick else ''}).",
              "", "Cells: speed-up over the same runtime's fp32 (median of per-round ratios; >1 = faster). "
              "`exact w/o VNNI`: rcdeploy's static int16 pair proof (the file computes the same on x86 with and "
              "without VNNI, in onnxruntime and, measured under `qemu-x86_64 -cpu Haswell`, in OpenVINO). "
              "`OV int8`: conv/matmul layers OpenVINO runs as int8 kernels. Forms: see the script's docstring; "
              "`(openvino)` = `rcdeploy export --runtime openvino` (int8 storage), `fl7` = first and last layers "
              "trained at 7 bits (`--first-last-bits 7`).", "",
              common.markdown_table(headers, rows), "",
              "Goal (issue: the 4-bit ResNet-20 file at least as fast, relative to fp32, in OpenVINO as "
              "onnxruntime's own QDQ file), reported, not asserted:", ""]
        md += [f"- {line}" for line in lines]
        common.write_section("openvino", "\n".join(md) + "\n")
        common.update_results("openvino", {"machine": info, "rounds": rounds, "exact_without_vnni": exact,
                                           "openvino_int8_layers": int8, "settings": res, "goal": lines})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per candidate per round")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.budget = 2, 0.05
    return run(args.rounds, args.budget, not args.no_write, args.quick)


if __name__ == "__main__":
    sys.exit(main())
