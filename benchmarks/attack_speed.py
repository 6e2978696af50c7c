"""Attack throughput: IFGSM-20 with the differentiable twin of an exported file vs with the PyTorch model,
and the wall time of a whole `rcdeploy bench` on the CIFAR-10 slice's test images.

    python benchmarks/attack_speed.py [--quick] [--images 128] [--rounds 3] [--threads 1]

The network is rcdeploy's ResNet-20 with 4-bit weights and 8-bit activations (random weights,
activations calibrated on real training images: attack cost does not depend on accuracy, IFGSM
runs all its steps). It is exported with rcdeploy.export.qdq.build_qdq (packed INT4 weights);
the twin is rcdeploy.deploy.twin.build_twin of that file, the reference is the Brevitas model
itself. Both run the same rcdeploy IFGSM (eps 8/255, step 2/255, 20 steps) on the same images,
alternating for `--rounds` rounds (one attack call each per round); img/s = images / median
time of a call. Then `rcdeploy bench` (rcdeploy.deploy.bench.bench_model: clean accuracy in
onnxruntime, IFGSM-20 through the twin scored by onnxruntime, graph inspection, latency at b1
and b64 in a child process) runs once on the file over all 932 test images of the slice (1,000
where the full test set is present). Torch threads default to 1 (on this shared 2-core machine two
OpenMP threads can wait on each other whenever another process holds a core: train_speed.py measured
a 4-bit pass at 2 threads from 35x slower to 1.7x faster than at 1, depending on the load); bench_model
gets the same count.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EPS, STEP, STEPS = 8 / 255, 2 / 255, 20


def make_model(data: Any) -> Any:
    import torch

    from rcdeploy.models import create_model
    from rcdeploy.quant.calibrate import calibrate_activations
    from rcdeploy.quant.spec import QuantSpec

    torch.manual_seed(0)
    meta = data.meta
    model = create_model("resnet20", num_classes=meta.num_classes, in_chans=meta.shape[0], mean=meta.mean,
                         std=meta.std, quant=QuantSpec(bits=4, act_bits=8, first_last_bits=8),
                         input_size=meta.shape[1])
    x = data.train.x
    calibrate_activations(model, [x[i:i + 128] for i in range(0, 16 * 128, 128)])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128, help="images per attack call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (twin, PyTorch model, bench)")
    ap.add_argument("--bench-samples", type=int, default=1000, help="test images for the whole rcdeploy bench")
    ap.add_argument("--quick", action="store_true", help="32 images, 1 round, bench on 64 images (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results.json alone")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.bench_samples = 32, 1, 64
    return run(images=args.images, rounds=args.rounds, threads=args.threads, bench_samples=args.bench_samples,
               write=not args.no_write, quick=args.quick)


def run(*, images: int, rounds: int, threads: int, bench_samples: int, write: bool = True,
        quick: bool = False) -> int:
    info = common.machine_info()
    results: dict[str, Any] = {"machine": info, "quick": quick, "images_per_call": images, "rounds": rounds,
                               "torch_threads": threads, "attack": f"ifgsm{STEPS}", "eps": EPS, "step": STEP}
    if not common.CIFAR_SLICE.is_dir():
        msg = f"skipped: the CIFAR-10 slice is not at {common.CIFAR_SLICE}"
        print(f"[attack] {msg}", file=sys.stderr)
        results["skipped"] = msg
        if write:
            common.update_results("attack", results)
            common.write_section("attack", "## Attack throughput\n\n" + msg.capitalize() + ".\n")
        return 0

    import torch

    from rcdeploy.attacks import IFGSM
    from rcdeploy.data import load_dataset
    from rcdeploy.deploy.bench import bench_model
    from rcdeploy.deploy.twin import build_twin
    from rcdeploy.export.qdq import build_qdq

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(threads)
    data = load_dataset("cifar10", common.CIFAR_SLICE)
    model = make_model(data)
    ex = build_qdq(model, tuple(data.meta.shape), storage="packed")
    out = common.SCRATCH / "attack"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resnet20-w4.onnx"
    path.write_bytes(ex.to_bytes())
    twin = build_twin(ex.model)
    x, y = data.test.x[:images].cpu(), data.test.y[:images].cpu()
    attack = IFGSM(EPS, STEP, STEPS)
    with torch.no_grad():
        agree = float((twin(x).argmax(1) == model(x).argmax(1)).float().mean())
    cands = {"twin of the exported file": lambda: attack(twin, x, y), "PyTorch (Brevitas) model": lambda: attack(model, x, y)}
    t = time.perf_counter()
    times = common.interleave(cands, rounds=rounds, runs=1, warmup=0 if quick else 1)
    print(f"[attack] {rounds} rounds in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    ips = {k: images / v.median for k, v in times.items()}
    ratio = common.round_ratio(times["PyTorch (Brevitas) model"], times["twin of the exported file"])
    results.update({"img_per_s": ips, "twin_speed_vs_pytorch": ratio,
                    "call_s": {k: v.summary() for k, v in times.items()},
                    "twin_pytorch_top1_agreement_clean": agree})

    t = time.perf_counter()
    report = bench_model(path, attacks=f"ifgsm{STEPS}", dataset="cifar10", data_dir=common.CIFAR_SLICE,
                         samples=bench_samples, eps=EPS, threads=threads, progress=False,
                         cache=False)  # timed: every chunk computed, none read back
    wall = time.perf_counter() - t
    rob = report["accuracy"]["robust"][0]
    lat = report.get("latency") or {}
    results["bench"] = {"wall_s": wall, "report_time_s": report["time_s"], "samples": report["settings"]["samples"],
                        "ifgsm20_time_s": rob["time_s"], "ifgsm20_img_per_s": rob["img_per_s"],
                        "clean_acc_pct": report["accuracy"]["clean_acc_pct"],
                        "twin_agreement_pct": report["accuracy"]["twin"].get("clean_agreement_pct"),
                        "latency_batches": [{k: b.get(k) for k in ("batch_size", "p50_ms", "repeats", "timed_s")}
                                            for b in lat.get("batches", [])],
                        "session_load_s": lat.get("session_load_s")}
    headers = ["IFGSM-20 gradients from", "img/s", "s per call (p25-p75)", "x PyTorch"]
    rows = []
    for k in cands:
        s = times[k].summary()
        rows.append([k, f"{ips[k]:.1f}", f"{s['median']:.2f} ({s['p25']:.2f}-{s['p75']:.2f})",
                     f"{ratio['median']:.2f}x" if k.startswith("twin") else "1.00x"])
    b = results["bench"]
    bench_line = (f"whole `rcdeploy bench` (ifgsm20, {b['samples']} CIFAR-10 slice test images, latency b1+b64): "
                  f"{b['wall_s']:.0f} s wall, of which IFGSM-20 {b['ifgsm20_time_s']:.0f} s "
                  f"({b['ifgsm20_img_per_s']:.1f} img/s)")
    print(f"\nResNet-20 w4, IFGSM-20 on {images} CIFAR-10 slice images, {rounds} rounds, {threads} torch thread(s)")
    print(common.text_table(headers, rows))
    print(bench_line)
    if write:
        common.update_results("attack", results)
        common.write_section("attack", markdown(results, headers, rows, bench_line))
        print(f"[attack] wrote {common.MARKDOWN.name} (attack section)", file=sys.stderr)
    return 0


def markdown(r: dict[str, Any], headers: list, rows: list, bench_line: str) -> str:
    b = r["bench"]
    lat = "; ".join(f"b{x['batch_size']} {x['p50_ms']:.2f} ms over {x['repeats']} runs" for x in b["latency_batches"])
    return "\n".join([
        "## Attack throughput: twin of the exported file vs the PyTorch model, same run", "",
        f"Machine: {common.machine_line(r['machine'])}. `python benchmarks/attack_speed.py`"
        f"{' --quick (smoke run, not for quoting)' if r['quick'] else ''}.", "",
        f"ResNet-20, 4-bit weights / 8-bit activations (random weights, calibrated activations), exported by "
        f"rcdeploy (packed INT4). rcdeploy's IFGSM-20 (eps 8/255, step 2/255) on {r['images_per_call']} CIFAR-10 "
        f"slice test images per call, gradients from the differentiable twin rebuilt from the ONNX file "
        f"(straight-through rounding) or from the Brevitas model itself; {r['rounds']} alternating rounds, "
        f"{r['torch_threads']} torch thread(s). Clean top-1 agreement twin vs PyTorch on these images: "
        f"{100 * r['twin_pytorch_top1_agreement_clean']:.1f}%.", "",
        common.markdown_table(headers, rows),
        f"Per-round twin/PyTorch speed ratio: median {r['twin_speed_vs_pytorch']['median']:.2f}x "
        f"(range {r['twin_speed_vs_pytorch']['min']:.2f}-{r['twin_speed_vs_pytorch']['max']:.2f}).", "",
        f"The {bench_line} (`bench_model(..., threads={r['torch_threads']})`; the report's own total "
        f"{b['report_time_s']:.0f} s). Its latency step: {lat or 'not run'}. Accuracy figures of this "
        f"untrained network are chance level and not the point here.", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
