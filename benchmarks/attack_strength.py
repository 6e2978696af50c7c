"""Attack strength on the deployed file: the robust accuracy each attack leaves, side by side, and its time.

    python benchmarks/attack_strength.py [--quick] [--cifar-samples 200] [--cifar-epochs 4] [--no-write]

Two models, each trained, exported (4-bit, verified) and benched by rcdeploy in this run:

- the quick-start model: `rcdeploy train` with no arguments (digits, small_cnn, 4-bit, PGD at eps 0.1, half
  the channels removed), exported with `--bits 4 --prune-channels`, scored on all 359 digits test images;
- a CIFAR-slice ResNet-20, 4-bit weights / 8-bit activations, FGSM-RS at eps 8/255 for `--cifar-epochs`
  epochs (a short run: the point is how the attacks rank on a quantized ResNet, not its accuracy), scored on a
  fixed subset of the slice's test images at eps 8/255.

Every attack runs on every scored image (not AutoAttack's cascade), so each row is that attack's own figure;
the worst case is per image over clean and every row; "first broke" credits each image to the first row (in
this order) that brought it to its worst score, "only it" counts images no other row brought as low. Rows
marked @smooth take their gradients from the graph's smooth surrogate (rounding removed); Square queries
onnxruntime. Times are wall seconds of the attack on this shared 2-core machine (load recorded).
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

# The attacks bench had before issue 11, then the autoattack preset's members (AutoAttack's order).
ATTACKS = "fgsm,ifgsm20,pgd20,cw20,autoattack"
QUICK_ATTACKS = "fgsm,ifgsm20,pgd20,cw20,autoattack-fast"


def train_export(out: Path, name: str, export_kw: dict[str, Any], **train_kw: Any) -> Path:
    """Train (rcdeploy.api.train) and export (verified) one model; reuses a finished export in `out`."""
    import rcdeploy

    onnx_path = out / f"{name}.onnx"
    if onnx_path.is_file():
        print(f"[strength] reusing {onnx_path}", file=sys.stderr)
        return onnx_path
    t = time.perf_counter()
    run = rcdeploy.train(out=str(out / "runs"), name=name, **train_kw)
    print(f"[strength] trained {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rcdeploy.export(run.run_dir / "best.pt", output=onnx_path, **export_kw)
    return onnx_path


def bench_rows(path: Path, attacks: str, **kw: Any) -> dict[str, Any]:
    from rcdeploy.deploy.bench import bench_model

    t = time.perf_counter()
    rep = bench_model(path, attacks=attacks, latency=False, progress=True, **kw)
    acc = rep["accuracy"]
    broken = acc["first_broken_by"]
    rows = [{"attack": r["name"], "gradients": r["gradient_source"], "robust_acc_pct": r["robust_acc_pct"],
             "time_s": r["time_s"], "first": broken["first"][r["name"]], "only": broken["only"][r["name"]],
             "within_eps": r["within_eps"] and r["in_unit_range"]} for r in acc["robust"]]
    return {"file": str(path), "samples": acc["samples"], "eps": rep["settings"]["eps"],
            "clean_acc_pct": acc["clean_acc_pct"], "worst_case_acc_pct": acc["worst_case_acc_pct"],
            "clean_wrong": broken["first"]["clean"], "held": broken["first"]["robust"], "rows": rows,
            "flags": acc["flags"], "wall_s": time.perf_counter() - t, "file_bytes": rep["size"]["file_bytes"]}


def table(r: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["attack", "gradients", "robust acc", "time s", "first broke", "only it"]
    rows = [[x["attack"], x["gradients"], f"{x['robust_acc_pct']:.1f}%", f"{x['time_s']:.1f}", str(x["first"]),
             str(x["only"])] for x in r["rows"]]
    rows.insert(0, ["clean", "-", f"{r['clean_acc_pct']:.1f}%", "-", str(r["clean_wrong"]), ""])
    rows.append(["**worst case**", "", f"**{r['worst_case_acc_pct']:.1f}%**", f"{sum(x['time_s'] for x in r['rows']):.0f}",
                 f"{r['held']} held", ""])
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar-samples", type=int, default=200, help="CIFAR-slice test images scored")
    ap.add_argument("--cifar-epochs", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="autoattack-fast, 32 CIFAR images, 1 epoch (smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results.json alone")
    args = ap.parse_args(argv)
    if args.quick:
        args.cifar_samples, args.cifar_epochs = 32, 1
    attacks = QUICK_ATTACKS if args.quick else ATTACKS
    warnings.filterwarnings("ignore")
    out = common.SCRATCH / ("strength-quick" if args.quick else "strength")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": common.machine_info(), "quick": args.quick, "attacks": attacks,
                               "cifar_epochs": args.cifar_epochs}

    quick_start = train_export(out, "quickstart", {"bits": 4, "prune_channels": True})
    results["quickstart"] = bench_rows(quick_start, attacks)
    if common.CIFAR_SLICE.is_dir():
        cifar = train_export(out, f"cifar-resnet20-w4-e{args.cifar_epochs}", {"bits": 4},
                             config="cifar10-resnet20-w4", data_dir=str(common.CIFAR_SLICE), adv="fgsm-rs",
                             epochs=args.cifar_epochs, schedule="cosine", val_samples=200, val_attack="pgd10")
        results["cifar"] = bench_rows(cifar, attacks, data_dir=common.CIFAR_SLICE, samples=args.cifar_samples,
                                      eps="8/255")
    else:
        results["cifar"] = {"skipped": f"the CIFAR-10 slice is not at {common.CIFAR_SLICE}"}
    for key in ("quickstart", "cifar"):
        r = results[key]
        if "rows" in r:
            print(f"\n{key}: {r['samples']} images, eps {r['eps']:.4g}, file {r['file_bytes']:,} B")
            print(common.text_table(*table(r)))
            for f in r["flags"]:
                print("flag:", f)
    if not args.no_write:
        common.update_results("strength", results)
        common.write_section("strength", markdown(results))
        print(f"[strength] wrote {common.MARKDOWN.name} (strength section)", file=sys.stderr)
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = ["## Attack strength on the deployed file: each attack's robust accuracy, the worst case, time", "",
             f"Machine: {common.machine_line(results['machine'])}. `python benchmarks/attack_strength.py`"
             f"{' --quick (smoke run, not for quoting)' if results['quick'] else ''}.", "",
             "Each model is trained, exported (4-bit, verified) and benched by rcdeploy in the run. Every attack "
             "runs on every scored image and is scored by onnxruntime on the file; worst case = per image over "
             "clean and every row. first broke: images this row was the first (in this order) to bring to their "
             "worst score; only it: images no other row brought as low. ste: gradients of the straight-through "
             "twin; smooth: of the smooth surrogate (the graph without rounding); queries: onnxruntime outputs "
             "only. `autoattack` = apgd-ce100, apgd-ce100@smooth, apgd-t100 (9 targets), apgd-t100@smooth, "
             "fab-t100 (9 targets), fab-t100@smooth, "
             "square5000. Times on a shared 2-core machine.", ""]
    titles = {"quickstart": "Quick-start model (`rcdeploy train`; export --bits 4 --prune-channels), digits test "
                            "split",
              "cifar": f"CIFAR-10 slice ResNet-20, 4-bit, FGSM-RS, {results.get('cifar_epochs', '?')} epochs (a short "
                       "run: it ranks the attacks; it is not a robustness result)"}
    for key, title in titles.items():
        r = results.get(key, {})
        if "rows" not in r:
            lines += [f"### {title}", "", r.get("skipped", "not run") + ".", ""]
            continue
        lines += [f"### {title}", "", f"{r['samples']} images, eps {r['eps']:.4g}, file {r['file_bytes']:,} bytes, "
                  f"bench wall {r['wall_s']:.0f} s.", "", common.markdown_table(*table(r))]
        lines += [f"Flag: {f}" for f in r["flags"]] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
