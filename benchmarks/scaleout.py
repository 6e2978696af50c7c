"""Scale-out throughput: training img/s on 1 process vs N DDP ranks (gloo), and bench img/s with --nproc.

    python benchmarks/scaleout.py [--nproc 2] [--train-samples 1024] [--batch-size 64] [--steps 3]

Training: rcdeploy's ResNet-20, 4-bit weights, PGD-`steps` adversarial training at eps 8/255 on the
CIFAR-10 slice (../shared/data; digits when it is absent), one epoch of `train-samples` images, run
three ways in one invocation: one process with all cores (torch's threads = cores), one process of one
thread with N micro-batches (the step N ranks take, computed in turn), and N ranks of one thread each
(gloo over loopback). img/s is the epoch's training images over its training seconds (the fit loop's own
`img_per_s`: validation and checkpoints excluded). The N-rank run must end with the same weights as the
one-process N-micro-batch run; the script checks and prints the largest difference.

Bench: the quick-start-sized model of the training run is exported (4-bit, verified) and benched with
`ifgsm20` on `--bench-samples` test images with --nproc 1 and --nproc N (no chunk cache); img/s is images
over the bench call's wall time (the attack row's own time_s sums crafting time over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import rcdeploy  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _train(out: Path, name: str, args: argparse.Namespace, dataset: dict, **kw) -> dict:
    t = time.perf_counter()
    result = rcdeploy.train(None, out=str(out), name=name, model="resnet20", bits=4, adv="pgd", steps=args.steps,
                            epochs=1, train_samples=args.train_samples, batch_size=args.batch_size, lr=0.05,
                            val_attack="pgd3", seed=0, **dataset, **kw)
    m = result.metrics[-1]
    print(f"  {name}: {m['img_per_s']:.1f} img/s ({time.perf_counter() - t:.0f} s with setup)", flush=True)
    return {"img_per_s": m["img_per_s"], "train_time_s": m["train_time_s"], "run_dir": str(result.run_dir)}


def _max_diff(a: str, b: str) -> float:
    sa = torch.load(Path(a) / "last.pt", weights_only=False)["state_dict"]
    sb = torch.load(Path(b) / "last.pt", weights_only=False)["state_dict"]
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())


def _bench(model: Path, nproc: int, samples: int) -> dict:
    t = time.perf_counter()
    report = rcdeploy.bench(model, attacks="ifgsm20", samples=samples, nproc=nproc, latency=False, cache=False)
    d = report.to_dict()
    row = d["accuracy"]["robust"][0]
    wall = time.perf_counter() - t
    return {"img_per_s": samples / wall, "wall_s": wall, "robust_acc_pct": row["robust_acc_pct"],
            "per_image": d["accuracy"]["per_image"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bench-samples", type=int, default=932)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cifar = (DATA / "cifar10-slice").is_dir()
    dataset = {"dataset": "cifar10", "data_dir": str(DATA / "cifar10-slice"), "val_samples": 100} if cifar else {
        "dataset": "digits", "val_samples": 100}
    cores = os.cpu_count() or 1
    result: dict = {"machine": common.machine_info(), "dataset": dataset["dataset"], "nproc": args.nproc,
                    "settings": vars(args), "train": {}, "bench": {}}
    print(common.machine_line(result["machine"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="rcdeploy-scaleout-") as tmp:
        out = Path(tmp)
        train = result["train"]
        one, micro, ranks = (f"1 process, {cores} threads", f"1 process, {args.nproc} micro-batches, 1 thread",
                             f"{args.nproc} ranks, 1 thread each")
        train[one] = _train(out, "one", args, dataset, threads=cores)
        # The reference N ranks must equal: same micro-batches and the same thread count per process (a
        # different count changes the summation order inside torch's kernels, so not the bits).
        train[micro] = _train(out, "micro", args, dataset, threads=1, micro_batches=args.nproc)
        train[ranks] = _train(out, "ranks", args, dataset, nproc=args.nproc, threads=1)
        result["ranks_vs_micro_max_diff"] = _max_diff(train[micro]["run_dir"], train[ranks]["run_dir"])
        result["train_speedup"] = train[ranks]["img_per_s"] / train[one]["img_per_s"]
        result["train_speedup_vs_one_thread"] = train[ranks]["img_per_s"] / train[micro]["img_per_s"]
        print(f"  ranks vs micro-batches: largest weight difference {result['ranks_vs_micro_max_diff']:.3g}; "
              f"speed-up {result['train_speedup']:.2f}x vs {one}, {result['train_speedup_vs_one_thread']:.2f}x vs "
              "1 thread", flush=True)
        model = out / "model.onnx"
        rcdeploy.export(Path(train[one]["run_dir"]) / "last.pt", output=str(model))
        for n in (1, args.nproc):
            result["bench"][f"--nproc {n}"] = b = _bench(model, n, args.bench_samples)
            print(f"  bench --nproc {n}: {b['img_per_s']:.1f} img/s (ifgsm20 {b['robust_acc_pct']:.1f}%)", flush=True)
    benches = list(result["bench"].values())
    result["bench_per_image_identical"] = benches[0].pop("per_image") == benches[-1].pop("per_image", None)
    result["bench_speedup"] = benches[-1]["img_per_s"] / benches[0]["img_per_s"]
    for row in result["train"].values():
        row.pop("run_dir", None)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
