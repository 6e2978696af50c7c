"""Reproduce seed 002 (EnResNet + RGSM, arXiv 2003.00631 Table 2) in short form on the CIFAR-10 slice.

Trains the short recipes `recipes/seed002-*-short.yaml` on ../shared/data/cifar10-slice, scores each best
checkpoint on the slice's test images (clean, FGSM, IFGSM20, CW20 at eps 8/255, step 2/255; stochastic
models with expectation over transformation: attack gradients and accuracies averaged over the
recipe's `eot` noise draws) and writes a table in the paper's form, next to the paper's figures, into
the `seed002` section of BENCHMARKS.md (other scripts own the other sections). The table is rewritten
after every row, so an interrupted run keeps what it measured.

The short recipes are tiny (500 training images, 3 epochs of batch 32, PGD-1 training) so that the six runs fit in
about 25 minutes on 2 CPU cores: absolute figures are far below the paper's 200-epoch, 50k-image runs;
only orderings can be compared, and at this size even those are noisy.

    python benchmarks/reproduce_seed002.py                      # all six rows
    python benchmarks/reproduce_seed002.py --rows resnet20,en5resnet20 --test-samples 100
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT.parent / "shared" / "data" / "cifar10-slice"
ROWS = ("resnet20", "resnet20-rgsm", "en2resnet20", "en2resnet20-rgsm", "en5resnet20", "en5resnet20-rgsm")
LABELS = {"resnet20": "ResNet20", "en2resnet20": "En2ResNet20", "en5resnet20": "En5ResNet20"}
# arXiv 2003.00631, Table 2 (PGD-10 training, 200 epochs, full CIFAR-10): clean, IFGSM20, channel sparsity (%).
PAPER = {"resnet20": (76.07, 47.25, None), "en5resnet20": (81.41, 51.60, None),
         "en5resnet20-rgsm": (80.53, 50.63, 53.36)}
ATTACKS = ("fgsm", "ifgsm20", "cw20")
EPS, STEP = 8 / 255, 2 / 255
START, END = "<!-- seed002:start -->", "<!-- seed002:end -->"


def _label(row: str) -> str:
    base, _, extra = row.partition("-")
    return LABELS[base] + (" + RGSM" if extra == "rgsm" else "")


@torch.no_grad()
def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> float:
    return sum(int((model(x).argmax(1) == y).sum()) for _ in range(draws)) / draws


def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, batch: int = 100) -> dict[str, float]:
    """Clean and robust accuracy (%) per attack, each the mean over `eot` forward passes."""
    from rcdeploy.attacks import parse_attack

    model.eval()
    out = {"clean": 100 * sum(_correct(model, x[i:i + batch], y[i:i + batch], eot)
                              for i in range(0, len(x), batch)) / len(x)}
    for name in ATTACKS:
        attack = parse_attack(name, eps=EPS, step=STEP, eot=eot, seed=0)
        hits = 0.0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            hits += _correct(model, attack(model, xb, yb), yb, eot)
        out[name] = 100 * hits / len(x)
    return out


def run_row(row: str, out: Path, test_samples: int, train: bool) -> dict[str, Any]:
    from rcdeploy.config import make_config
    from rcdeploy.data import load_dataset
    from rcdeploy.train.checkpoint import load_model
    from rcdeploy.train.loop import fit
    from rcdeploy.train.unstructured import sparsity_report

    recipe = f"seed002-{row}-short"
    cfg = make_config(recipe, {"out": str(out), "name": row, "data_dir": str(SLICE)})
    t0 = time.perf_counter()
    if train:
        fit(cfg)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    model, ckpt = load_model(out / row / "best.pt")
    data = load_dataset("cifar10", SLICE)
    x, y = data.test.x[:test_samples], data.test.y[:test_samples]
    torch.manual_seed(0)
    t1 = time.perf_counter()
    acc = score(model, x, y, cfg.eot)
    engine = (ckpt.get("sparsity") or {}).get("channel_sparsity")
    return {"row": row, "label": _label(row), "recipe": recipe, "model": cfg.model, "width": cfg.width,
            "eot": cfg.eot, "epochs": cfg.epochs, "train_samples": cfg.train_samples, "steps": cfg.steps,
            "test_samples": len(x), "best_epoch": (ckpt.get("best") or {}).get("epoch"), **acc,
            **sparsity_report(model), "removable_channel_share": engine,
            "train_s": train_s if train else None, "eval_s": time.perf_counter() - t1}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def table(results: list[dict[str, Any]], total_s: float, test_samples: int) -> str:
    lines = [
        "## Seed 002: EnResNet + RGSM (arXiv 2003.00631, Table 2), short runs on the CIFAR-10 slice",
        "",
        f"`python benchmarks/reproduce_seed002.py` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{total_s / 60:.1f} min on this machine's shared CPU cores). Short recipes "
        "(`recipes/seed002-*-short.yaml`): width 0.5 (8-16-32 channels per member), float weights and "
        "activations, **500 training images, 3 epochs at batch 32 (48 SGD steps, cosine lr from 0.05), PGD-1 training** "
        "(random start, step 10/255); the paper "
        "trains width 1 on 50,000 images for 200 epochs with PGD-10. Scored on the first "
        f"{test_samples} test images of the slice at eps 8/255, step 2/255; EnResNets with EOT (attack gradients "
        "and accuracy averaged over the recipe's noise draws). Channel sparsity is the paper's: the share of "
        "conv filters with norm < 1e-15. Absolute numbers are far below the paper's; only orderings compare, "
        "and at this size they are within noise.",
        "",
        "| model | EOT | clean % | FGSM % | IFGSM20 % | CW20 % | channel sparsity % | train s | "
        "paper clean / IFGSM20 (sparsity) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        p = PAPER.get(r["row"])
        paper = "—" if p is None else f"{p[0]:.2f} / {p[1]:.2f}" + (f" ({p[2]:.2f}%)" if p[2] else "")
        train_s = "—" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['label']} | {r['eot']} | {_pct(r['clean'])} | {_pct(r['fgsm'])} | {_pct(r['ifgsm20'])} | "
                     f"{_pct(r['cw20'])} | {100 * r['paper_channel_sparsity']:.1f} | {train_s} | {paper} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this script's section of BENCHMARKS.md; other sections stay as they are."""
    block = f"{START}\n{text}{END}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.S)
    new = pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    ap.add_argument("--test-samples", type=int, default=50, help="test images scored per row")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "seed002"), help="folder for the training runs")
    ap.add_argument("--no-train", action="store_true", help="score the runs already in --out")
    ap.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if not SLICE.is_dir():
        print(f"error: the CIFAR-10 slice is not at {SLICE}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="fast_hadamard_transform")
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for row in rows:
        r = run_row(row, Path(args.out), args.test_samples, train=not args.no_train)
        results.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        write_section(Path(args.markdown), table(results, time.perf_counter() - t0, args.test_samples))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; table in {args.markdown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
