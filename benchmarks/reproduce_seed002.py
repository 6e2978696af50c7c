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

Full mode (issue 16, item 5; the `seed002-full` section and results.json key):

    python benchmarks/reproduce_seed002.py --full --epochs 10 [--rows ...] [--test-samples N] [--eot N]
                                           [--export-bits 4] [--threads 2] [--quick] [--no-write]

trains the six rows from the paper-setting recipes `recipes/seed002-<row>.yaml` (PGD-10 training at eps 8/255,
8-bit QAT as the recipes set it, the RGSM rows with their RGSM settings) on the whole slice's training split
(10% of it held out as validation, `val_fraction`; the test split is never used for a choice), with the same
`--epochs E` for every row (the recipes' 200 overridden; the lr drops at 40/60/80% scale with E). Each row's
best.pt is scored in PyTorch on `--test-samples` test images (default all 932): clean, FGSM, IFGSM20, CW20 at
eps 8/255, step 2/255, worst case per image, EnResNets with EOT (the recipe's `eot`, or `--eot`); then exported by
`rcdeploy.export` at `--export-bits` (4: post-training quantization of the 8-bit QAT weights; EnResNet files keep
their noise) and the deployed file scored with the same attacks by `rcdeploy.deploy.bench.bench_model` (`eot`).
Rows run one at a time, each in a worker process; resumable per row: a finished row is kept in
.bench/perf/seed002-full-e{E}/<row>.row.json and reused while its settings hold, an interrupted training continues
from its last.pt, an interrupted PyTorch scoring at the attack it stopped in, an interrupted bench from its chunk
cache. `--quick` is a smoke run: 1 epoch, 256 training images (FGSM validation on 64), 32 test images, rows
resnet20,en2resnet20-rgsm.

Wall time of `--full --epochs 10` on 2 CPU cores: an ESTIMATE of about 10 days (roughly 230 hours), extrapolated
linearly from one `--quick` smoke run on 2 cores shared with another benchmark (load ~5): ResNet20 PGD-10 training
72 s per 256 images per epoch; PyTorch scoring 100 s per 32 test images (IFGSM20 36 s, CW20 53 s); the 4-bit file
benched in 33 s per 32 images; scaled by images (4,194 training, 466 validation with IFGSM20 each epoch, 932 test)
and by members x EOT draws for the EnResNets (En2: 2 x 5, En5: 5 x 5; the EOT validation and scoring dominate).
The per-row total is about 1 : 6 : 15 for ResNet20 : En2 : En5. An idle machine is perhaps twice as fast; the
run is meant for the GPU machine (or for fewer epochs / `--rows` / `--test-samples` on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import row_runs  # noqa: E402

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


# ================================================================================ full mode (issue 16, item 5)

FULL_KEY = "seed002-full"
EXPORT_BITS = 4
QUICK = {"epochs": 1, "train_samples": 256, "test_samples": 32, "val_samples": 64, "val_attack": "fgsm",
         "rows": ("resnet20", "en2resnet20-rgsm")}
RUN_ONLY = ("out", "name", "threads", "nproc", "max_restarts", "device")  # settings that do not change a result
PAPER_EPOCHS = 200


def log(msg: str) -> None:
    print(f"[seed002] {msg}", file=sys.stderr, flush=True)


def full_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What the full mode changes in every paper-setting recipe: the data, the epochs (the same for every row)
    and, for --quick only, a training-image cap and a smaller, cheaper (FGSM) validation."""
    kw: dict[str, Any] = {"data_dir": str(SLICE), "epochs": args.epochs}
    if args.quick:
        kw |= {k: QUICK[k] for k in ("train_samples", "val_samples", "val_attack")}
    return kw


def full_spec(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything a row's result depends on: training (recipe + overrides, resolved), export and scoring."""
    from rcdeploy.config import make_config

    recipe, kw = f"seed002-{row}", full_overrides(args)
    cfg = {k: v for k, v in make_config(recipe, kw).to_dict().items() if k not in RUN_ONLY}
    eot = args.eot if args.eot is not None else cfg["eot"]
    score = {"attacks": list(ATTACKS), "samples": args.test_samples, "eps": "8/255", "step": "2/255", "eot": eot}
    return common._jsonable({"row": row, "train": {"recipe": recipe, "overrides": kw, "resolved": cfg},
                             "export": {"bits": args.export_bits}, "score": score, "threads": args.threads})


def train_row(row: str, spec: dict[str, Any], out: Path) -> Path:
    """Train (or continue from last.pt) one row; returns its run folder."""
    run_dir = row_runs.prepare_run(out, row, spec["train"], log)
    epochs = spec["train"]["resolved"]["epochs"]
    reporter = row_runs.EpochLines(row, lambda m: epoch_text(row, m, epochs), log)
    return row_runs.train_or_resume(row, spec["train"]["recipe"], spec["train"]["overrides"], run_dir,
                                    epochs=epochs, threads=spec["threads"], reporter=reporter, log=log)


def epoch_text(row: str, m: dict[str, Any], epochs: int) -> str:
    return (f"{row}: epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.3f}  train {m['train_acc']:5.1f}%  "
            f"val clean {m['val_clean_acc']:5.1f}%  robust {m['val_robust_acc']:5.1f}%  "
            f"train {m['train_time_s']:.0f} s")


def test_index(n: int | None) -> list[int]:
    """The test images bench scores for `--samples n` (all, or its fixed subset): PyTorch scores the same."""
    from rcdeploy.data import load_dataset
    from rcdeploy.deploy.bench_inputs import _subset

    total = len(load_dataset("cifar10", SLICE).test)
    return [int(i) for i in _subset(total, total if n is None else min(n, total))]


@torch.no_grad()
def _correct_each(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> list[float]:
    hits = sum((model(x).argmax(1) == y).float() for _ in range(draws))
    return (hits / draws).tolist()


def torch_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eot: int,
                 batch: int = 100) -> list[float]:
    """Per-image share of the `eot` draws classified correctly, clean ('clean') or under attack `name`."""
    from rcdeploy.attacks import parse_attack

    torch.manual_seed(0)
    attack = None if name == "clean" else parse_attack(name, eps=EPS, step=STEP, eot=eot, seed=0)
    out: list[float] = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        out += _correct_each(model, xb if attack is None else attack(model, xb, yb), yb, eot)
    return out


def score_torch(row: str, spec: dict[str, Any], run_dir: Path, out: Path) -> dict[str, Any]:
    """best.pt in PyTorch on the bench's test images: clean and every attack (EOT), each kept in its own file
    so an interrupted scoring resumes at the attack it stopped in; plus the paper's channel sparsity."""
    from rcdeploy.data import load_dataset
    from rcdeploy.train.checkpoint import load_model
    from rcdeploy.train.unstructured import sparsity_report

    model, ckpt = load_model(run_dir / "best.pt")
    model.eval()
    sc = spec["score"]
    index = test_index(sc["samples"])
    data = load_dataset("cifar10", SLICE)
    x, y = data.test.x[index], data.test.y[index]
    per: dict[str, list[float]] = {}
    for name in ("clean", *sc["attacks"]):
        cache = out / f"{row}.torch-{name}.json"
        if cache.is_file():
            per[name] = json.loads(cache.read_text())
            continue
        t = time.perf_counter()
        per[name] = torch_attack(model, x, y, name, sc["eot"])
        cache.write_text(json.dumps(per[name]) + "\n")
        log(f"{row}: PyTorch {name} {100 * sum(per[name]) / len(x):.1f}% on {len(x)} test images, "
            f"{time.perf_counter() - t:.0f} s")
    return {"test_index": index, "per_image": per, **figures(per), "sparsity": sparsity_report(model),
            "best": (ckpt.get("best") or {})}


def figures(per: dict[str, list[float]]) -> dict[str, Any]:
    """Accuracy (%) per column and the per-image worst case over clean and every attack."""
    worst = [min(v) for v in zip(*per.values())]
    acc = {k: 100 * sum(v) / len(v) for k, v in per.items()}
    return {"acc": acc | {"worst": 100 * sum(worst) / len(worst)}, "worst": worst, "n": len(worst)}


def bench_file(row: str, spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """The deployed file scored by bench_model, one call per attack (each resumable from its chunk cache)."""
    from rcdeploy.deploy.bench import bench_model

    sc, per, flags, index, size = spec["score"], {}, [], None, {}
    for name in sc["attacks"]:
        t = time.perf_counter()
        rep = bench_model(path, attacks=name, dataset="cifar10", data_dir=SLICE, samples=sc["samples"],
                          eps=sc["eps"], step=sc["step"], eot=sc["eot"], latency=False, threads=spec["threads"],
                          progress=False)
        acc = rep["accuracy"]
        p = acc["per_image"]
        (att,) = acc["robust"]
        draws = max(1, int(p["of_draws"]))
        per.setdefault("clean", [c / draws for c in p["correct_draws"][p["order"].index("clean")]])
        per[name] = [c / draws for c in p["correct_draws"][p["order"].index(att["name"])]]
        index, size = p["test_index"], rep.get("size") or {}
        flags += [f"{name}: {f}" for f in acc.get("flags") or []]
        log(f"{row}: file {name} {att['robust_acc_pct']:.1f}% (clean {acc['clean_acc_pct']:.1f}%) on "
            f"{acc['samples']} test images, {time.perf_counter() - t:.0f} s")
    return {"test_index": index, "per_image": per, **figures(per), "flags": flags, "draws": draws,
            "file_bytes": size.get("file_bytes")}


def export_row(row: str, spec: dict[str, Any], run_dir: Path, out: Path) -> dict[str, Any]:
    """best.pt -> the verified integer file at the export bits (EnResNets keep their noise); an export error is
    recorded, not raised (the row keeps its PyTorch figures)."""
    import rcdeploy

    path = out / f"{row}.onnx"
    if not path.is_file():
        try:
            rcdeploy.export(run_dir / "best.pt", output=path, **spec["export"])
        except Exception as e:  # noqa: BLE001 (VerificationError, UsageError: reported in the table)
            log(f"{row}: export failed: {type(e).__name__}: {e}")
            return {"export_error": f"{type(e).__name__}: {e}"}
    card = json.loads(path.with_suffix(".json").read_text())
    return {"file": str(path), "bits": card.get("bits"), "notes": card.get("notes"),
            "verification": card.get("verification")}


def full_worker(spec_path: Path) -> int:
    """One row in its own process (row_runs.row_worker): train, score best.pt, export, bench the file."""
    return row_runs.row_worker(spec_path, full_row)


def full_row(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    row, t = spec["row"], time.perf_counter()
    run_dir = train_row(row, spec, out)
    hist = row_runs.run_history(run_dir)
    res: dict[str, Any] = {"row": row, "label": _label(row), "spec": spec, "train_wall_s": time.perf_counter() - t,
                           "train_s": sum(float(h.get("train_time_s") or 0) for h in hist)}
    res["torch"] = score_torch(row, spec, run_dir, out)
    res |= export_row(row, spec, run_dir, out)
    if "file" in res:
        res["deployed"] = bench_file(row, spec, Path(res["file"]))
    return res


def start_worker(row: str, spec: dict[str, Any], out: Path) -> int:
    """Run one row's worker to the end (output copied to `<row>.log` and stderr); returns its exit status."""
    proc, pump = row_runs.start_row_worker(__file__, row, spec, out, log)
    try:
        status = proc.wait()
        pump.join(timeout=10)
        return status
    except KeyboardInterrupt:
        proc.terminate()  # rcdeploy saves last.pt at the batch it stops at
        proc.wait(timeout=120)
        raise


def finished_row(out: Path, row: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    p = out / f"{row}.row.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())
    return r if r.get("spec") == spec else None


def full_command(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/reproduce_seed002.py --full"]
    parts += ["--quick"] if args.quick else [f"--epochs {args.epochs}"]
    if args.rows != ",".join(QUICK["rows"] if args.quick else ROWS):
        parts.append(f"--rows {args.rows}")
    for flag, val, default in (("--test-samples", args.test_samples, QUICK["test_samples"] if args.quick else None),
                               ("--eot", args.eot, None), ("--export-bits", args.export_bits, EXPORT_BITS),
                               ("--threads", args.threads, 2)):
        if val != default:
            parts.append(f"{flag} {val}")
    return " ".join(parts)


def run_full(args: argparse.Namespace, rows: list[str]) -> int:
    """Every row, one worker process at a time, each reused from its row JSON while its settings hold."""
    out = common.SCRATCH / f"seed002-full{'-quick' if args.quick else ''}-e{args.epochs}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": common.machine_info(), "command": full_command(args), "quick": args.quick,
                               "epochs": args.epochs, "threads": args.threads, "export_bits": args.export_bits,
                               "rows": {}}
    failed = []
    for row in rows:
        spec = full_spec(row, args)
        r = finished_row(out, row, spec)
        if r is not None:
            log(f"{row}: reusing {out / (row + '.row.json')}")
        elif start_worker(row, spec, out) != 0 or (r := finished_row(out, row, spec)) is None:
            failed.append(row)
            log(f"{row}: FAILED (log {out / (row + '.log')})")
            continue
        results["rows"][row] = r
        results["wall_s"] = time.perf_counter() - t0
        save_full(results, args)
    print(common.text_table(*full_table(results)))
    print("\n".join(ordering_sentences(results)))
    return 1 if failed else 0


def save_full(results: dict[str, Any], args: argparse.Namespace) -> None:
    if args.no_write:
        return
    slim = {k: v for k, v in results.items() if k != "rows"}
    slim["rows"] = {n: {k: v for k, v in r.items() if k not in ("torch", "deployed", "spec")}
                    | {"torch": strip(r.get("torch")), "deployed": strip(r.get("deployed")),
                       "settings": settings_of(r)} for n, r in results["rows"].items()}
    common.update_results(FULL_KEY, slim)
    common.write_section(FULL_KEY, full_markdown(results))


def strip(part: dict[str, Any] | None) -> dict[str, Any] | None:
    """A scoring without its per-image arrays (they stay in the scratch folder)."""
    return None if part is None else {k: v for k, v in part.items() if k not in ("per_image", "worst", "test_index")}


def settings_of(r: dict[str, Any]) -> dict[str, Any]:
    c = r["spec"]["train"]["resolved"]
    return {"recipe": r["spec"]["train"]["recipe"], "model": c["model"], "width": c["width"], "bits": c["bits"],
            "act_bits": c["act_bits"], "epochs": c["epochs"], "train_samples": c["train_samples"],
            "val_fraction": c["val_fraction"], "steps": c["steps"], "eot": r["spec"]["score"]["eot"],
            "export_bits": r["spec"]["export"]["bits"],
            "sparsity": c["sparsity"] if c["prune_channels"] else None, "prune_channels": c["prune_channels"]}


# ----------------------------------------------------------------------------------------- full-mode output


def _se(p_pct: float, n: int) -> float:
    """Binomial standard error of an accuracy, in points: sqrt(p (1 - p) / n)."""
    p = p_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _cell(part: dict[str, Any] | None, key: str) -> str:
    if not part or key not in part["acc"]:
        return "-"
    v = part["acc"][key]
    return f"{v:.1f} ± {_se(v, part['n']):.1f}"


def _paper(row: str) -> str:
    p = PAPER.get(row)
    return "-" if p is None else f"{p[0]:.2f} / {p[1]:.2f}" + (f" ({p[2]:.2f}%)" if p[2] else "")


def full_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "EOT", "clean %", "FGSM %", "IFGSM20 %", "CW20 %", "worst %", "file clean %",
               "file IFGSM20 %", "file worst %", "channel sparsity %", "train min", "paper clean / IFGSM20 (sparsity)"]
    lines = []
    for row, r in results["rows"].items():
        t, d = r["torch"], r.get("deployed")
        sparsity = 100 * t["sparsity"]["paper_channel_sparsity"]
        lines.append([r["label"], str(r["spec"]["score"]["eot"])] + [_cell(t, k) for k in ("clean", *ATTACKS, "worst")]
                     + [_cell(d, k) for k in ("clean", "ifgsm20", "worst")]
                     + [f"{sparsity:.1f}", f"{r['train_s'] / 60:.1f}", _paper(row)])
    return headers, lines


# (row a, row b, what the paper reports, expectation: a "higher" than b, or "no loss" of a against b)
ORDERINGS = (
    ("en2resnet20", "resnet20", "EnResNets more robust than ResNet20", "higher"),
    ("en5resnet20", "resnet20", "EnResNets more robust than ResNet20 (51.60 vs 47.25)", "higher"),
    ("en2resnet20-rgsm", "resnet20-rgsm", "EnResNets more robust than ResNet20, also with RGSM", "higher"),
    ("en5resnet20-rgsm", "resnet20-rgsm", "EnResNets more robust than ResNet20, also with RGSM", "higher"),
    ("resnet20-rgsm", "resnet20", "RGSM costs little robustness at equal model", "no loss"),
    ("en2resnet20-rgsm", "en2resnet20", "RGSM costs little robustness at equal model", "no loss"),
    ("en5resnet20-rgsm", "en5resnet20", "RGSM costs about 1 point (50.63 vs 51.60)", "no loss"),
    ("en5resnet20", "en2resnet20", "more ensemble members, more robustness", "higher"),
    ("en5resnet20-rgsm", "en2resnet20-rgsm", "more ensemble members, more robustness", "higher"),
)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same images, in points, and its standard error (paired)."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return 100 * mean, 100 * math.sqrt(var / len(d))


def difference(results: dict[str, Any], a: str, b: str, part: str) -> tuple[float, float] | None:
    """(a - b, SE) in points on IFGSM20 of the PyTorch models (`torch`) or the files (`deployed`)."""
    ra, rb = (results["rows"].get(x, {}).get(part) for x in (a, b))
    if not ra or not rb or ra["test_index"] != rb["test_index"]:
        return None
    return paired(ra["per_image"]["ifgsm20"], rb["per_image"]["ifgsm20"])


def judged(d: tuple[float, float] | None, expect: str) -> str:
    """'+x ± se points, beyond/within 2 SE: holds / does not hold' for an expected ordering."""
    if d is None:
        return "not measured"
    beyond = abs(d[0]) > 2 * d[1]
    if expect == "higher":
        verdict = ("holds" if d[0] > 0 else "does not hold") + ("" if beyond else " (within noise)")
    else:  # "no loss": broken only by a loss beyond 2 SE
        verdict = "does not hold" if d[0] < 0 and beyond else "holds"
    return f"{d[0]:+.1f} ± {d[1]:.1f} points, {'beyond' if beyond else 'within'} 2 SE: {verdict}"


def ordering_sentences(results: dict[str, Any]) -> list[str]:
    """One sentence per ordering of the paper both of whose rows ran, from the measured per-image figures."""
    out = []
    for a, b, claim, expect in ORDERINGS:
        if a not in results["rows"] or b not in results["rows"]:
            continue
        la, lb = _label(a), _label(b)
        out.append(f"- {la} vs {lb} (paper: {claim}): IFGSM20 {la} minus {lb}, PyTorch "
                   f"{judged(difference(results, a, b, 'torch'), expect)}; deployed files "
                   f"{judged(difference(results, a, b, 'deployed'), expect)}.")
    return out or ["- No ordering of the paper can be judged: it needs two of its rows."]


FULL_INTRO = """
Every row trained from its paper-setting recipe (`recipes/seed002-<row>.yaml`: PreAct ResNet-20 / EnResNet-20 at
width {width}, PGD-{steps} adversarial training at eps 8/255 step 2/255, SGD Nesterov lr 0.1 divided by 10 at
40/60/80% of the epochs, weight decay 5e-4, batch 128; RGSM rows with the recipe's RGSM settings and the mask fixed
for the last 20% of the epochs; the recipes train {bits}-bit weights and {act}-bit activations (QAT), not float as
the paper) on the CIFAR-10 slice: {train} of its {total} training images ({val_pct:g}% held out, seeded and
stratified, to pick the checkpoint: best ({val_attack}, clean) accuracy on up to {val_n} of them; the test split is
never used for a choice), **{epochs} epoch(s) for every row: {share} of the paper's {paper_epochs} epochs** on 50,000 images
(the lr drops scale with the epochs).
|
Scored on {samples} test images at eps 8/255, step 2/255: FGSM, IFGSM20, CW20; worst = per image over clean and the
three attacks. EnResNets (noise kept at test time) with EOT: attack gradients and accuracy averaged over the EOT
noise draws. Columns without "file": best.pt in PyTorch (the {bits}-bit QAT model). "file" columns: best.pt exported
by `rcdeploy.export` at {export_bits} bits ({export_note}; verified; EnResNet files keep their noise) and scored on
the deployed file by `rcdeploy.deploy.bench.bench_model` (onnxruntime, same attacks and images, `--eot`). ± is the
binomial standard error sqrt(p(1-p)/n). Channel sparsity is the paper's: the share of conv filters with norm <
1e-15 in best.pt. train min: training minutes summed over epochs (without validation), {threads} torch thread(s).
"""


def intro_values(results: dict[str, Any]) -> dict[str, Any]:
    from rcdeploy.data import load_dataset

    first = next(iter(results["rows"].values()))
    s, sc = first["spec"]["train"]["resolved"], first["spec"]["score"]
    data = load_dataset("cifar10", SLICE, val_fraction=s["val_fraction"], seed=s["seed"])
    total = len(data.train) + len(data.val)
    ptq = s["bits"] != results["export_bits"]
    return {"width": s["width"] or 1, "steps": s["steps"], "bits": s["bits"], "act": s["act_bits"],
            "train": s["train_samples"] or f"all {len(data.train):,}", "total": f"{total:,}",
            "val_pct": 100 * s["val_fraction"], "val_attack": s["val_attack"],
            "val_n": s["val_samples"] or "all", "epochs": results["epochs"],
            "share": f"{results['epochs']}/{PAPER_EPOCHS} = {100 * results['epochs'] / PAPER_EPOCHS:g}%", "paper_epochs": PAPER_EPOCHS,
            "samples": first["torch"]["n"], "export_bits": results["export_bits"],
            "export_note": (f"post-training quantization of the {s['bits']}-bit QAT weights to "
                            f"{results['export_bits']} bits" if ptq else "the trained bits"),
            "threads": results["threads"], "eot": sc["eot"]}


def full_markdown(results: dict[str, Any]) -> str:
    lines = ["## Seed 002 at full slice size: EnResNet + RGSM (arXiv 2003.00631, Table 2) on the CIFAR-10 slice", "",
             f"Machine: {common.machine_line(results['machine'])}. `{results['command']}`"
             f"{' (smoke run, not for quoting)' if results['quick'] else ''}; wall "
             f"{results.get('wall_s', 0) / 60:.0f} min for the rows run in that invocation.", ""]
    lines += [" ".join(p.split()) + "\n" for p in FULL_INTRO.format(**intro_values(results)).strip().split("\n|\n")]
    lines += [common.markdown_table(*full_table(results)),
              "Which of the paper's orderings hold here (IFGSM20, a minus b on the same test images, ± the paired "
              "standard error of the difference; 'beyond 2 SE' is the test):", ""]
    lines += ordering_sentences(results) + [""] + row_notes(results)
    return "\n".join(lines) + "\n"


def row_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for r in results["rows"].values():
        best, d = r["torch"].get("best") or {}, r.get("deployed") or {}
        extra = [f"best epoch {best.get('epoch')}"]
        if "export_error" in r:
            extra.append(f"export failed: {r['export_error']}")
        extra += [f"file {d['file_bytes']:,} B" if d.get("file_bytes") else "", *(d.get("flags") or [])]
        notes.append(f"- {r['label']}: " + "; ".join(e for e in extra if e) + ".")
    missing = [n for n in ROWS if n not in results["rows"]]
    return notes + ([f"- not run: {', '.join(_label(n) for n in missing)}."] if missing else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=None, help=f"comma list of: {', '.join(ROWS)} (default all)")
    ap.add_argument("--test-samples", type=int, default=None,
                    help="test images scored per row (default 50; --full: all 932)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "seed002"), help="folder for the short training runs")
    ap.add_argument("--no-train", action="store_true", help="score the short runs already in --out")
    ap.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="also write the short results as JSON here")
    full = ap.add_argument_group("full mode (paper-setting recipes on the whole slice)")
    full.add_argument("--full", action="store_true", help="the six rows at the paper's settings, PyTorch and file")
    full.add_argument("--epochs", type=int, default=10, help="epochs for every row (paper: 200)")
    full.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    full.add_argument("--eot", type=int, default=None, help="EOT draws for the EnResNets (default: the recipe's)")
    full.add_argument("--export-bits", type=int, default=EXPORT_BITS, help="bits of the deployed file")
    full.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 256 training images, 32 test "
                      "images, rows resnet20,en2resnet20-rgsm")
    full.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and results.json alone")
    full.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.full and args.quick:
        args.epochs = QUICK["epochs"]
        args.test_samples = args.test_samples or QUICK["test_samples"]
    args.rows = args.rows or ",".join(QUICK["rows"] if args.full and args.quick else ROWS)
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return full_worker(args.worker)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if not SLICE.is_dir():
        print(f"error: the CIFAR-10 slice is not at {SLICE}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="fast_hadamard_transform")
    if args.full:
        signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the worker too (it saves last.pt), as Ctrl-C does
        try:
            return run_full(args, rows)
        except KeyboardInterrupt:
            log("interrupted: finished rows, checkpoints and score caches are kept; rerun the same command to resume")
            return 130
    return run_short(args, rows, 50 if args.test_samples is None else args.test_samples)


def run_short(args: argparse.Namespace, rows: list[str], test_samples: int) -> int:
    """The short reproduction (the `seed002` section), as before."""
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for row in rows:
        r = run_row(row, Path(args.out), test_samples, train=not args.no_train)
        results.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        write_section(Path(args.markdown), table(results, time.perf_counter() - t0, test_samples))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; table in {args.markdown}", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
