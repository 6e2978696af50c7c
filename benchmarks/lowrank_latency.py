"""Latency of a dense vs a CSTAR-factorized integer model at equal bits, in onnxruntime on this CPU.

    python benchmarks/lowrank_latency.py [--model resnet20] [--width 1] [--ratio 8] [--multiple 8] [--rounds 20]

Both models have random weights (latency does not depend on accuracy) with activations calibrated on
uniform images; the factorized one has the ranks `rcdeploy.train.lowrank.allocate` picks for the dense
weights at `--ratio`. Both are written by rcdeploy.export.qdq.build_qdq (4-bit packed weights, 8-bit
activations) and timed alternately, one onnxruntime thread, at batch 1 and 64; figures are medians.
Prints MACs, stored parameters, file bytes and the speed-up (dense time / factorized time).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from rcdeploy.export.qdq import build_qdq
from rcdeploy.models import create_model
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec
from rcdeploy.runtime.session import open_session, run_logits
from rcdeploy.train.lowrank import allocate, candidate_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    kw = dict(num_classes=10, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, input_size=32, width=args.width)
    quant = QuantSpec(bits=4)
    torch.manual_seed(0)
    dense = create_model(args.model, quant=quant, **kw)
    alloc = allocate({n: m.weight.detach() for n, m in candidate_layers(dense)}, args.ratio, args.multiple)
    factorized = create_model(args.model, quant=quant, low_rank=alloc.structure(), **kw)
    calib = [torch.rand(16, 3, 32, 32) for _ in range(2)]
    models = {}
    for label, m in (("dense", dense), ("factorized", factorized)):
        calibrate_activations(m, calib)
        ex = build_qdq(m.eval(), (3, 32, 32))
        models[label] = {"session": open_session(ex.model, threads=1), "macs": sum(x.macs for x in ex.layers),
                         "params": sum(x.params for x in ex.layers), "bytes": len(ex.to_bytes())}
    result = {"model": args.model, "width": args.width, "ratio_asked": args.ratio, "ratio": alloc.ratio,
              "forms": {f: sum(p.form == f for p in alloc.plans.values()) for f in ("tucker", "folded", "folded-out", "dense")},
              **{k: {f: v[f] for f in ("macs", "params", "bytes")} for k, v in models.items()}}
    for batch in (1, 64):
        x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds if batch == 1 else max(3, args.rounds // 5)):
            for k, v in models.items():
                t0 = time.perf_counter()
                run_logits(v["session"], x)
                times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(t)) * 1e3 for k, t in times.items()}
        result[f"batch{batch}_ms"] = med
        result[f"batch{batch}_speedup"] = med["dense"] / med["factorized"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
