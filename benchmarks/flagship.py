"""The flagship benchmark (issue 16, item 1): does a 4-bit, half-channel ResNet-20 file keep the robustness of a
float ResNet-20 trained by plain PyTorch in the same run, at the same training budget?

    python benchmarks/flagship.py [--epochs 30] [--rows yardstick,float,w4,w4-p50] [--attacks autoattack]
                                  [--samples N] [--train-samples N] [--jobs 1] [--threads 2] [--quick]
                                  [--no-write]

CIFAR-10 slice (../shared/data/cifar10-slice: 4,660 training images, 932 test images), eps 8/255. Every row is
trained from scratch with the same budget: `--epochs` epochs, batch 128, FGSM-RS (Wong et al. 2020: uniform
start in the eps ball, one step of 1.25 eps, clamped to [0, 1]), SGD momentum 0.9 Nesterov, weight decay 5e-4,
one-cycle learning rate peaking at 0.2 (torch's OneCycleLR with its defaults, momentum not cycled; rcdeploy's
`--schedule onecycle` is the same curve step for step). 10% of the training split (seeded, stratified:
rcdeploy's `val_fraction`) is held out; the checkpoint kept is the epoch with the best (PGD-10, clean) accuracy on
it. The test split is never used for a choice.

- `yardstick`: a standard CIFAR ResNet-20 (3 stages of 3 BasicBlocks, 16/32/64 channels, 1x1-conv shortcuts)
  in plain torch.nn, trained by the loop in this file (rcdeploy's dataset reader and its validation helper
  only), exported to a float ONNX file (torch.onnx) and benched by rcdeploy like the others; its PyTorch
  clean / PGD-20 on the same test images are kept beside as a cross-check.
- `float`: rcdeploy's ResNet-20 with float weights (`--bits float`, 8-bit activations, first and last layer
  8-bit as in every row), deployed as the 8-bit integer file (`export bits=8`: rcdeploy's integer ONNX has no
  float layers; the weights are post-training quantized at export, verified).
- `w4`: the recipe `cifar10-resnet20-w4-p50` without the pruning (4-bit weights, first/last 8-bit).
- `w4-p50`: the recipe `cifar10-resnet20-w4-p50`: `w4` plus `--prune-channels 0.5` (group lasso, the mask fixed
  for the last 30% of the epochs), exported with `prune_channels=True` (the dead channels removed from the file).

Every rcdeploy row is trained by `rcdeploy.train`, exported (verified) by `rcdeploy.export` and every row's file
is benched by `rcdeploy.deploy.bench.bench_model` on the deployed file (onnxruntime): clean, PGD-20 and the
`--attacks` preset (default `autoattack`, the strongest rcdeploy has) on the `--samples` test images (default
all 932); worst case = per image over clean and every attack. Latency (bench's `cpu` target, batch 1 and 64) is
measured after all training, one file at a time. Rows train one at a time (`--jobs`), each with `--threads`
torch threads (bench too). Resumable: every finished row is kept in the scratch folder
(.bench/perf/flagship-e{epochs}/<row>.row.json) and reused while its settings are unchanged; an interrupted
training continues from its last.pt, an interrupted bench from its chunk cache. The scratch folder lives only as
long as the machine, so finished rows are also kept, with their per-image scores, in benchmarks/results.json
(committed): the same command on a fresh clone, in a later session, reuses them (while their settings' digest
matches) and runs only the rest; each row records when and on which CPU it was measured. One progress line per
epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import row_runs  # noqa: E402

KEY = "flagship"
RECIPE = "cifar10-resnet20-w4-p50"
ROWS = ("yardstick", "float", "w4", "w4-p50")
ATTACKS = "autoattack"
QUICK_ATTACKS = "pgd20"
GOAL_POINTS = 3.0
YARDSTICK_VERSION = 1  # bump when the yardstick's training loop changes: its finished rows are then retrained
TITLES = {"yardstick": "yardstick: PyTorch float ResNet-20", "float": "rcdeploy float weights (int8 file)",
          "w4": "rcdeploy 4-bit", "w4-p50": "rcdeploy 4-bit, 50% channels"}
ROW_SETTINGS: dict[str, dict[str, Any]] = {"float": {"bits": "float", "prune_channels": 0.0},
                                           "w4": {"prune_channels": 0.0}, "w4-p50": {}}
ROW_EXPORT: dict[str, dict[str, Any]] = {"float": {"bits": 8}, "w4": {}, "w4-p50": {"prune_channels": True}}
# Item 2's levers: each is the w4-p50 row with one change, trained at the same budget and scored on clean and
# PGD-20 (the goal's two figures; the strong preset is for the four rows above). Few-step inner attacks keep each
# lever near FGSM-RS's cost (2 steps of 2.5 eps / 2: ours, for the budget; the papers use 10).
LEVERS: dict[str, dict[str, Any]] = {
    "w4-p50-ard": {"adv": "ard", "steps": 2, "alpha": 1.0, "distill_temperature": 30.0},
    "w4-p50-ft50": {"finetune_fraction": 0.5},
    "w4-p50-trades": {"adv": "trades", "steps": 2},
    "w4-p50-mixed": {"adv": "mixed", "alpha": 0.7, "steps": 1, "step_size": 1.25 * 8 / 255},
}
TEACHER_ROW = "float"  # ARD's teacher: the same run's dense float row (the lever distills it into the 4-bit student)
TITLES |= {"w4-p50-ard": "lever: ARD from the float row (T 30, alpha 1, PGD-2)",
           "w4-p50-ft50": "lever: mask fixed at mid-run (fine-tune 50%)",
           "w4-p50-trades": "lever: TRADES (beta 6, PGD-2) for FGSM-RS",
           "w4-p50-mixed": "lever: 0.3 CE clean + 0.7 CE adversarial (FGSM-RS's step)"}
LEVER_ATTACKS = "pgd20"
QUICK = {"epochs": 1, "train_samples": 256, "samples": 32, "val_samples": 64}
RUN_ONLY = ("out", "name", "threads", "nproc", "max_restarts", "device")  # settings that do not change a result


def log(msg: str) -> None:
    print(f"[flagship] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- settings


def base_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's overrides every rcdeploy row shares (the budget); the yardstick reads the same."""
    kw: dict[str, Any] = {"data_dir": str(common.CIFAR_SLICE), "epochs": args.epochs}
    if args.train_samples is not None:
        kw["train_samples"] = args.train_samples
    if args.quick:
        kw["val_samples"] = QUICK["val_samples"]
    return kw


def resolved(overrides: dict[str, Any]) -> dict[str, Any]:
    """The full training config a row runs with (recipe < overrides), without the settings that only say
    where or how fast it runs: a row is reused while this is unchanged."""
    from rcdeploy.config import make_config

    cfg = make_config(RECIPE, overrides).to_dict()
    return {k: v for k, v in cfg.items() if k not in RUN_ONLY}


def yardstick_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The yardstick's budget: the rcdeploy rows' epochs, batch, optimizer, lr, eps, data and validation."""
    keys = ("dataset", "data_dir", "val_fraction", "train_samples", "epochs", "batch_size", "lr", "momentum",
            "nesterov", "weight_decay", "eps", "val_attack", "val_samples", "seed")
    return {k: cfg[k] for k in keys} | {"schedule": "torch OneCycleLR defaults, cycle_momentum=False",
                                        "version": YARDSTICK_VERSION}


def row_spec(name: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Everything a row's result depends on (`train`: the trained file; `bench`: its scoring)."""
    base = base_settings(args)
    bench = {"attacks": attack_list(args.attacks), "samples": args.samples, "eps": "8/255"}
    if name == "yardstick":
        train = {"yardstick": yardstick_settings(resolved(base))}
    elif name in ROW_SETTINGS:
        kw = base | ROW_SETTINGS[name]
        train = {"config": RECIPE, "overrides": kw, "resolved": resolved(kw), "export": ROW_EXPORT[name]}
    elif name in LEVERS:
        kw = base | LEVERS[name]
        bench["attacks"] = LEVER_ATTACKS
        if teacher := needs(name):
            kw["teacher"] = str(scratch_folder(args) / "runs" / teacher / "best.pt")
        train = {"config": RECIPE, "overrides": kw, "resolved": resolved(kw), "export": ROW_EXPORT["w4-p50"]}
        if teacher:  # the teacher row's own settings: a retrained teacher retrains the student
            train["teacher_row"] = row_spec(teacher, args, threads)["train"]
    else:
        raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS + tuple(LEVERS))}")
    return {"row": name, "train": common._jsonable(train), "bench": bench, "threads": threads}


def needs(name: str) -> str | None:
    """The row whose trained checkpoint this row reads (ARD's teacher), if any."""
    return TEACHER_ROW if LEVERS.get(name, {}).get("adv") == "ard" else None


def scratch_folder(args: argparse.Namespace) -> Path:
    return common.SCRATCH / f"flagship{'-quick' if args.quick else ''}-e{args.epochs}"


def attack_list(preset: str) -> str:
    """`--attacks` with PGD-20 first (the table's column), unless the list already has it."""
    from rcdeploy.attacks import PRESETS

    names = [n.strip() for s in preset.split(",") if s.strip() for n in PRESETS.get(s.strip().lower(), s).split(",")]
    return ",".join(names if "pgd20" in names else ["pgd20", *names])


# ----------------------------------------------------------------------------------------- yardstick model


def resnet20(mean: list[float], std: list[float], classes: int = 10) -> Any:
    """A standard CIFAR ResNet-20 in plain torch.nn, normalization inside (it takes [0, 1] images)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (out + self.shortcut(x)).relu()

    class ResNet20(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            import torch

            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            blocks, cin = [], 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for i in range(3):
                    blocks.append(Block(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x: Any) -> Any:
            x = self.blocks(self.stem((x - self.mean) / self.std))
            return self.fc(x.mean((2, 3)))

    return ResNet20()


def augment(x: Any, gen: Any, pad: int = 4) -> Any:
    """Random crop with `pad` zero pixels each side and a random horizontal flip, per image, on tensors."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def fgsm_rs(model: Any, x: Any, y: Any, eps: float, gen: Any) -> Any:
    """Wong et al. 2020: uniform start in the eps ball, one signed-gradient step of 1.25 eps, clamped."""
    import torch
    import torch.nn.functional as F

    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
    delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


# ----------------------------------------------------------------------------------------- yardstick training


def yardstick_data(s: dict[str, Any]) -> Any:
    """The rcdeploy rows' exact split (rcdeploy's reader: same held-out validation, same training subset)."""
    import dataclasses

    import torch

    from rcdeploy.data import load_dataset
    from rcdeploy.data.core import Split

    data = load_dataset(s["dataset"], s["data_dir"], val_fraction=s["val_fraction"], seed=s["seed"])
    n = s["train_samples"]
    if n is not None and n < len(data.train):  # rcdeploy.train.loop._train_subset's permutation
        idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(s["seed"] * 31 + 17))[:n]
        data = dataclasses.replace(data, train=Split(data.train.x[idx], data.train.y[idx]))
    return data


def yardstick_state(s: dict[str, Any], data: Any, run_dir: Path) -> dict[str, Any]:
    """Model, optimizer and scheduler, restored from run_dir/last.pt when the run was interrupted."""
    import torch

    torch.manual_seed(s["seed"])
    model = resnet20(list(data.meta.mean), list(data.meta.std), data.meta.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                          weight_decay=s["weight_decay"])
    steps = math.ceil(len(data.train) / s["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["lr"], total_steps=s["epochs"] * steps,
                                                cycle_momentum=False)
    st: dict[str, Any] = {"model": model, "opt": opt, "sched": sched, "steps": steps, "epoch": 0, "history": [],
                          "best": None}
    last = run_dir / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        st.update(epoch=ck["epoch"], history=ck["history"], best=ck["best"])
        log(f"yardstick: resuming {run_dir} at epoch {ck['epoch'] + 1}")
    return st


def yardstick_epoch(st: dict[str, Any], s: dict[str, Any], data: Any, epoch: int) -> dict[str, float]:
    """One epoch of FGSM-RS training: its loss, accuracy and seconds."""
    import torch
    import torch.nn.functional as F

    model, opt, sched = st["model"], st["opt"], st["sched"]
    model.train()
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(s["seed"] * 7919 + epoch))
    loss_sum = correct = lr = 0.0
    t0 = time.perf_counter()
    for b in range(st["steps"]):
        idx = order[b * s["batch_size"]:(b + 1) * s["batch_size"]]
        gen = torch.Generator().manual_seed((s["seed"] * 1_000_003 + epoch) * 100_003 + b)
        x, y = augment(data.train.x[idx], gen), data.train.y[idx]
        logits = model(fgsm_rs(model, x, y, s["eps"], gen))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        loss_sum += float(loss) * len(y)
        correct += float((logits.argmax(1) == y).sum())
    n = len(data.train)
    return {"lr": lr, "train_loss": loss_sum / n, "train_acc": 100 * correct / n,  # lr: the last step's, as rcdeploy's
            "train_time_s": time.perf_counter() - t0}


def yardstick_validate(model: Any, s: dict[str, Any], data: Any) -> dict[str, float]:
    """rcdeploy's per-epoch validation (same images, attack and seeds as the rcdeploy rows)."""
    from rcdeploy.train.loop import evaluate

    n = len(data.val) if s["val_samples"] is None else min(s["val_samples"], len(data.val))
    ev = evaluate(model, data.val.x[:n], data.val.y[:n], s["val_attack"], s["eps"], seed=s["seed"])
    return {"val_clean_acc": ev["clean_acc"], "val_robust_acc": ev["robust_acc"]}


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_yardstick(s: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train (or continue) the yardstick; best.pt holds the best validation epoch. Returns the history."""
    data = yardstick_data(s)
    st = yardstick_state(s, data, run_dir)
    model = st["model"]
    for epoch in range(st["epoch"], s["epochs"]):
        m = {"epoch": epoch + 1} | yardstick_epoch(st, s, data, epoch)
        t = time.perf_counter()
        m |= yardstick_validate(model, s, data) | {"val_time_s": time.perf_counter() - t}
        st["history"].append(m)
        best = st["best"]
        if best is None or (m["val_robust_acc"], m["val_clean_acc"]) > (best["val_robust_acc"], best["val_clean_acc"]):
            st["best"] = m
            atomic_torch_save({"model": model.state_dict(), "metrics": m}, run_dir / "best.pt")
        atomic_torch_save({"model": model.state_dict(), "opt": st["opt"].state_dict(),
                           "sched": st["sched"].state_dict(), "epoch": epoch + 1, "history": st["history"],
                           "best": st["best"]}, run_dir / "last.pt")
        log(epoch_text("yardstick", m, s["epochs"], s["val_attack"]))
    return {"history": st["history"], "best": st["best"], "meta": data.meta, "data": data}


def epoch_text(row: str, m: dict[str, Any], epochs: int, attack: str) -> str:
    return (f"{row}: epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.3f}  train {m['train_acc']:5.1f}%  "
            f"val clean {m['val_clean_acc']:5.1f}%  {attack} {m['val_robust_acc']:5.1f}%  "
            f"train {m['train_time_s']:.0f} s  lr {m['lr']:.4f}" + (f"  [{m['phase']}]" if m.get("phase") else ""))


def export_yardstick(path: Path, run_dir: Path, meta: Any, x: Any) -> dict[str, Any]:
    """best.pt -> a float ONNX file; checked against PyTorch on `x` (top-1 agreement, max |logit diff|)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    model = resnet20(list(meta.mean), list(meta.std), meta.num_classes)
    model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["model"])
    model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(model, x[:1], str(tmp), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    check = {"images": len(x), "top1_agreement_pct": 100 * float((ref.argmax(1) == got.argmax(1)).mean()),
             "max_abs_logit_diff": float(np.abs(ref - got).max())}
    if check["top1_agreement_pct"] < 99.5:
        raise RuntimeError(f"float ONNX export disagrees with PyTorch: {check}")
    tmp.replace(path)
    return check


def yardstick_pytorch_scores(run_dir: Path, meta: Any, x: Any, y: Any, eps: float) -> dict[str, float]:
    """Clean and PGD-20 (eps/4 steps, random start) of the PyTorch model on the bench's test images."""
    import torch

    from rcdeploy.train.loop import evaluate

    model = resnet20(list(meta.mean), list(meta.std), meta.num_classes)
    model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["model"])
    ev = evaluate(model, x, y, "pgd20", eps, seed=0)
    return {"clean_acc_pct": ev["clean_acc"], "pgd20_acc_pct": ev["robust_acc"]}


# ----------------------------------------------------------------------------------------- rcdeploy rows


def train_rcdeploy(name: str, train: dict[str, Any], run_dir: Path, threads: int) -> Path:
    """Train (or continue) one rcdeploy row; returns its run folder."""
    cfg = train["resolved"]
    reporter = row_runs.EpochLines(name, lambda m: epoch_text(name, m, cfg["epochs"], cfg["val_attack"]), log)
    return row_runs.train_or_resume(name, train["config"], train["overrides"], run_dir, epochs=cfg["epochs"],
                                    threads=threads, reporter=reporter, log=log)


def history_of(run_dir: Path) -> list[dict[str, Any]]:
    keep = ("epoch", "phase", "lr", "train_loss", "train_acc", "val_clean_acc", "val_robust_acc", "train_time_s")
    return [{k: h.get(k) for k in keep} | {"channel_sparsity": (h.get("sparsity") or {}).get("channel_sparsity")}
            for h in row_runs.run_history(run_dir)]


# ----------------------------------------------------------------------------------------- worker


def train_and_export(name: str, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train + export one row (both skipped when `<row>.trained.json` says they are done)."""
    done = out / f"{name}.trained.json"
    onnx_path = out / f"{name}.onnx"
    # first: it removes a run (and file) of other settings; the yardstick's own loop writes into its folder
    run_dir = row_runs.prepare_run(out, name, spec["train"], log, make_run_dir=name == "yardstick")
    if done.is_file() and onnx_path.is_file():
        return json.loads(done.read_text())
    t = time.perf_counter()
    info: dict[str, Any] = {"file": str(onnx_path), "run_dir": str(run_dir)}
    if name == "yardstick":
        s = spec["train"]["yardstick"]
        res = train_yardstick(s, run_dir)
        info |= {"history": res["history"], "best": res["best"], "train_wall_s": time.perf_counter() - t}
        info["export_check"] = export_yardstick(onnx_path, run_dir, res["meta"], res["data"].val.x[:512])
    else:
        import rcdeploy

        train_rcdeploy(name, spec["train"], run_dir, spec["threads"])
        info["train_wall_s"] = time.perf_counter() - t
        info["history"] = history_of(run_dir)
        rcdeploy.export(run_dir / "best.pt", output=onnx_path, **spec["train"]["export"])
        info |= card_summary(json.loads(onnx_path.with_suffix(".json").read_text()))
    info["train_time_s"] = sum(float(h.get("train_time_s") or 0.0) for h in info["history"])
    done.write_text(json.dumps(common._jsonable(info), indent=1) + "\n")
    log(f"{name}: trained and exported ({info['train_time_s']:.0f} s training)")
    return info


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    tm = card.get("training_metrics") or {}
    return {"best": tm.get("best"), "verification": card.get("verification"), "bits": card.get("bits"),
            "channels_kept": card.get("channels_kept"), "card_macs": card.get("macs"), "notes": card.get("notes")}


CASCADE_ORDER = {"ste": 0, "smooth": 1, "queries": 2}  # straight-through first: what the others add is masking


def cascade_order(attacks: list[str]) -> list[str]:
    """PGD-20 first (the table's column, on every image), then the straight-through attacks, the smooth
    surrogate's, the black-box ones, each group in the preset's order."""
    from rcdeploy.attacks import parse_attacks

    def source(a: str) -> str:
        (atk,) = parse_attacks(a, eps=8 / 255)
        return "queries" if atk.black_box else atk.gradients

    first, rest = attacks[:1], attacks[1:]
    return first + sorted(rest, key=lambda a: CASCADE_ORDER.get(source(a), 1))


def bench_row(name: str, spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """Score the deployed file as AutoAttack's standard version does: PGD-20 on every image (clean and PGD-20
    columns), then each further attack only on the images all earlier ones failed on (an image already broken
    stays broken: the worst case is the same as every attack on every image, at a fraction of the cost). Each
    attack is its own bench call (a line each, resumable from its chunk cache). Per attack: the images it broke
    first and the robust accuracy after it (cumulative). Masking check: what the smooth-surrogate and black-box
    attacks break after every straight-through one failed, against two standard errors."""
    b = spec["bench"]
    t = time.perf_counter()
    order = cascade_order(b["attacks"].split(","))
    first = bench_attack(name, spec, path, order[0], None)
    index, n = first["test_index"], len(first["test_index"])
    alive = [min(c, a) for c, a in zip(first["clean"], first["attacked"])]
    after, broke = {order[0]: pct(alive)}, {order[0]: sum(first["clean"]) - sum(alive)}
    times, flags = {order[0]: first["time_s"]}, list(first["flags"])
    sources = {order[0]: first["row"]["gradient_source"]}
    for attack in order[1:]:
        todo, before = [index[k] for k in range(n) if alive[k]], sum(alive)
        if todo:
            rep = bench_attack(name, spec, path, attack, todo)
            hit = dict(zip(rep["test_index"], rep["attacked"]))
            alive = [min(v, hit.get(index[k], v)) for k, v in enumerate(alive)]
            flags += rep["flags"]
            sources[attack], times[attack] = rep["row"]["gradient_source"], rep["time_s"]
        broke[attack], after[attack] = before - sum(alive), pct(alive)
    return {"samples": n, "clean_acc_pct": first["clean_acc_pct"], "cascade": order,
            "robust": {order[0]: first["robust_acc_pct"]}, "robust_after": after, "broke_first": broke,
            "attack_time_s": times, "worst_case_acc_pct": pct(alive),
            "flags": flags + cascade_masking_flags(order, sources, after, n),
            "per_image": {"test_index": index, "clean": first["clean"], "pgd20": first["attacked"], "worst": alive},
            "file_bytes": first["file_bytes"], "macs": first["macs"],
            "integer_mac_share_pct": first["integer_mac_share_pct"], "bench_s": time.perf_counter() - t}


def pct(correct: list[int]) -> float:
    return 100 * sum(correct) / max(len(correct), 1)


def cascade_masking_flags(order: list[str], sources: dict[str, str], after: dict[str, float], n: int) -> list[str]:
    """The drop the smooth-surrogate and black-box attacks add after the last straight-through one, when it is
    more than two standard errors (at least one image) of the straight-through figure."""
    ste = [a for a in order if sources.get(a) == "ste"]
    if not ste or ste[-1] == order[-1]:
        return []
    from rcdeploy.deploy.attack_figures import noise_pct

    base, final = after[ste[-1]], after[order[-1]]
    tol = noise_pct(base, n)
    if base - final <= tol:
        return []
    return [f"likely gradient masking: after every straight-through attack ({base:.1f}%), the smooth-surrogate and "
            f"black-box attacks broke {base - final:.1f} points more (noise {tol:.1f})"]


def bench_attack(name: str, spec: dict[str, Any], path: Path, attack: str, todo: list[int] | None) -> dict[str, Any]:
    """One attack on the file (bench_model) on `todo` test images (None: the spec's samples), with its per-image
    scores and one progress line."""
    from rcdeploy.deploy.bench import bench_model

    b = spec["bench"]
    which = {"samples": b["samples"]} if todo is None else {"indices": todo}
    rep = bench_model(path, attacks=attack, dataset="cifar10", data_dir=common.CIFAR_SLICE, eps=b["eps"],
                      latency=False, threads=spec["threads"], progress=False, **which)
    acc = rep["accuracy"]
    per = acc["per_image"]
    (row,) = acc["robust"]
    log(f"{name}: {attack} {row['robust_acc_pct']:.1f}% (clean {acc['clean_acc_pct']:.1f}%) on {acc['samples']} "
        f"test images{'' if todo is None else ' (the survivors of the earlier attacks)'}, {row['time_s']:.0f} s")
    keep = ("name", "family", "gradient_source", "robust_acc_pct")
    return {"clean_acc_pct": acc["clean_acc_pct"], "robust_acc_pct": row["robust_acc_pct"], "time_s": row["time_s"],
            "row": {k: row[k] for k in keep},
            "flags": [f"{attack}: {f}" for f in acc["flags"]], "test_index": per["test_index"],
            "clean": per["correct_draws"][per["order"].index("clean")],
            "attacked": per["correct_draws"][per["order"].index(row["name"])], "file_bytes": rep["size"]["file_bytes"],
            "macs": rep["size"]["macs"], "integer_mac_share_pct": rep["size"].get("integer_mac_share_pct")}


def load_test_images(index: list[int] | None) -> tuple[Any, Any, Any]:
    from rcdeploy.data import load_dataset

    data = load_dataset("cifar10", common.CIFAR_SLICE)
    x, y = data.test.x, data.test.y
    return (x, y, data.meta) if index is None else (x[index], y[index], data.meta)


def worker(spec_path: Path) -> int:
    """One row in its own process (row_runs.row_worker): train, export, bench; writes `<row>.row.json`."""
    return row_runs.row_worker(spec_path, build_row)


def build_row(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    name = spec["row"]
    info = train_and_export(name, spec, out)
    row = {"row": name, "spec": spec} | info | bench_row(name, spec, Path(info["file"]))
    row["measured"] = measured_on()
    if name == "yardstick":
        x, y, meta = load_test_images(row["per_image"]["test_index"])
        row["pytorch"] = yardstick_pytorch_scores(Path(info["run_dir"]), meta, x, y, spec["train"]["yardstick"]["eps"])
    return row


# ----------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rows", default=",".join(ROWS + tuple(LEVERS)),
                    help=f"rows to run (default all: {', '.join(ROWS + tuple(LEVERS))})")
    ap.add_argument("--attacks", default=None, help=f"attack list or preset (default {ATTACKS}; pgd20 always added)")
    ap.add_argument("--samples", type=int, default=None, help="test images scored (default: all 932)")
    ap.add_argument("--train-samples", type=int, default=None, help="cap on training images (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="rows trained at once")
    ap.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads, shared by the jobs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 256 training images, 32 test images")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and results.json alone")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.train_samples = QUICK["epochs"], QUICK["train_samples"]
        args.samples = args.samples or QUICK["samples"]
    args.attacks = args.attacks or (QUICK_ATTACKS if args.quick else ATTACKS)
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/flagship.py"] + (["--quick"] if args.quick else [f"--epochs {args.epochs}"])
    if args.rows != ",".join(ROWS + tuple(LEVERS)):
        parts.append(f"--rows {args.rows}")
    if args.attacks != (QUICK_ATTACKS if args.quick else ATTACKS):
        parts.append(f"--attacks {args.attacks}")
    if args.samples is not None and not args.quick:
        parts.append(f"--samples {args.samples}")
    if args.train_samples is not None and not args.quick:
        parts.append(f"--train-samples {args.train_samples}")
    return " ".join(parts)


def start_worker(name: str, spec: dict[str, Any], out: Path) -> tuple[subprocess.Popen, threading.Thread]:
    return row_runs.start_row_worker(__file__, name, spec, out, log)


def finished(out: Path, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    p = out / f"{name}.row.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())
    same = r.get("spec", {}).get("train") == spec["train"] and r["spec"].get("bench") == spec["bench"]
    if same:  # what an older row.json did not record is this machine's: scratch never leaves its machine
        r["measured"] = measured_on(p.stat().st_mtime) | r.get("measured", {})
    return r if same else None


def run_rows(rows: list[str], specs: dict[str, dict[str, Any]], out: Path, jobs: int,
             save: Callable[[], None], results: dict[str, Any]) -> list[str]:
    """Every pending row in a worker process, `jobs` at a time; returns the failed rows."""
    pending = [n for n in rows if n not in results["rows"]]
    running: dict[str, tuple[subprocess.Popen, threading.Thread]] = {}
    failed: list[str] = []
    try:
        poll_rows(pending, running, failed, specs, out, jobs, save, results)
    except KeyboardInterrupt:
        stop_workers(running)
        log("interrupted: finished rows, checkpoints and bench chunks are kept; rerun the same command to resume")
        raise SystemExit(130) from None
    return failed


def stop_workers(running: dict[str, tuple[subprocess.Popen, threading.Thread]]) -> None:
    """SIGTERM each running worker (rcdeploy saves last.pt at its batch) and wait for it."""
    for name, (proc, _) in running.items():
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log(f"{name}: worker {proc.pid} did not stop in 120 s; killing it")
            proc.kill()


def poll_rows(pending: list[str], running: dict[str, tuple[subprocess.Popen, threading.Thread]],
              failed: list[str], specs: dict[str, dict[str, Any]], out: Path, jobs: int, save: Callable[[], None],
              results: dict[str, Any]) -> None:
    while pending or running:
        for name in [n for n in pending if "failed" in results["rows"].get(needs(n) or "", {})]:
            pending.remove(name)
            results["rows"][name] = {"row": name, "failed": f"its {needs(name)} row failed"}
            failed.append(name)
        while len(running) < max(1, jobs) and (ready := [n for n in pending if can_start(n, out, specs, results)]):
            pending.remove(ready[0])
            running[ready[0]] = start_worker(ready[0], specs[ready[0]], out)
        time.sleep(2)
        for name, (proc, pump) in list(running.items()):
            if proc.poll() is None:
                continue
            pump.join(timeout=10)
            del running[name]
            row = finished(out, name, specs[name])
            if proc.returncode != 0 or row is None:
                tail = (out / f"{name}.log").read_text().strip().splitlines()[-3:]
                results["rows"][name] = {"row": name, "failed": f"exit {proc.returncode}: " + " / ".join(tail)}
                failed.append(name)
                log(f"{name}: FAILED (log {out / (name + '.log')})")
            else:
                results["rows"][name] = row
                log(f"{name}: done: clean {row['clean_acc_pct']:.1f}%, PGD-20 {row['robust']['pgd20']:.1f}%, "
                    f"worst {row['worst_case_acc_pct']:.1f}%")
            save()


def can_start(name: str, out: Path, specs: dict[str, dict[str, Any]], results: dict[str, Any]) -> bool:
    """Whether the row it needs (ARD's teacher) is trained with its current settings: its row done, or its
    checkpoint and export there (its bench may still be running)."""
    need = needs(name)
    if need is None or need in results["rows"]:
        return True
    marker = out / "runs" / f"{need}.train.json"
    return (out / f"{need}.trained.json").is_file() and marker.is_file() \
        and json.loads(marker.read_text()) == specs[need]["train"]


def latency(name: str, path: Path) -> dict[str, Any]:
    """p50 at batch 1 and 64 (bench's cpu target: onnxruntime with its own thread count)."""
    from rcdeploy.deploy.bench import bench_model

    log(f"{name}: latency")
    rep = bench_model(path, attacks="none", dataset="cifar10", data_dir=common.CIFAR_SLICE, samples=16,
                      latency=True, batch_sizes="1,64", latency_seconds=2.0, progress=False)
    lat = rep.get("latency") or {}
    return {"p50_ms": {str(b["batch_size"]): b["p50_ms"] for b in lat.get("batches", [])},
            "threads": lat.get("intra_op_threads"), "errors": rep.get("errors")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    signal.signal(signal.SIGTERM, interrupt)  # a kill stops the workers too (they save and exit), as Ctrl-C does
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted: finished rows, checkpoints and bench chunks are kept; rerun the same command to resume")
        return 130


def run(args: argparse.Namespace) -> int:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    threads = max(1, args.threads // max(1, args.jobs))
    out = scratch_folder(args)
    if missing := [f"{n} needs the {needs(n)} row" for n in rows if needs(n) and needs(n) not in rows]:
        raise SystemExit(f"error: {'; '.join(missing)} (its teacher): add it to --rows")
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(out)  # noqa: F841 (held until this process exits)
    specs = {n: common._jsonable(row_spec(n, args, threads)) for n in rows}
    results = new_results(args, out)
    state, t0 = out / "results.json", time.perf_counter() - results.pop("_wall_before")

    def save() -> None:
        results["wall_s"] = time.perf_counter() - t0
        state.write_text(json.dumps(common._jsonable(results), indent=1) + "\n")
        if not args.no_write:
            common.update_results(KEY, kept_results(results))
            common.write_section(KEY, markdown(results))

    reuse_rows(rows, specs, out, results)
    failed = run_rows(rows, specs, out, args.jobs, save, results)
    measure_latencies(rows, results, out, save)
    save()
    print(common.text_table(*table(results)))
    print(verdict(results))
    if not args.no_write:
        log(f"wrote {common.MARKDOWN.name} ({KEY} section) and {common.RESULTS.name}")
    return 1 if failed else 0


def reuse_rows(rows: list[str], specs: dict[str, dict[str, Any]], out: Path, results: dict[str, Any]) -> None:
    """Put in `results` every row finished with its current settings: in the scratch folder, else kept in
    benchmarks/results.json by an earlier session. A kept row has no checkpoint on this machine, so a row whose
    checkpoint a pending lever reads (ARD's teacher) is rerun instead."""
    scratch = {n: finished(out, n, specs[n]) for n in rows}
    kept = {n: kept_row(n, specs[n]) for n in rows if scratch[n] is None}
    teachers = {needs(n): n for n in rows if needs(n) and scratch[n] is None and kept[n] is None}
    for n in rows:
        if scratch[n] is not None:
            results["rows"][n] = scratch[n]
            log(f"{n}: reusing {out / (n + '.row.json')}")
        elif kept[n] is not None and n in teachers:
            log(f"{n}: rerun, not reused from {common.RESULTS.name}: {teachers[n]} reads its checkpoint")
        elif kept[n] is not None:
            results["rows"][n] = kept[n]
            log(f"{n}: reusing {common.RESULTS.name} (measured {kept[n]['measured']['date_utc']} UTC)")


def lock_folder(out: Path) -> Any:
    """An exclusive lock on the scratch folder (released when this process exits): two runs of the same
    settings would train into the same run folders."""
    import fcntl

    f = (out / ".lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: another flagship run is using {out}; wait for it or stop it first") from None
    return f


def measure_latencies(rows: list[str], results: dict[str, Any], out: Path, save: Callable[[], None]) -> None:
    """Latency of every finished file, after all training and scoring, one file at a time (kept per row)."""
    for name in rows:
        row = results["rows"].get(name) or {}
        if "file" in row and not row.get("latency") and Path(row["file"]).is_file():
            row["latency"] = latency(name, Path(row["file"]))
            (out / f"{name}.row.json").write_text(json.dumps(common._jsonable(row), indent=1) + "\n")
            save()


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def new_results(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The run's header; a resumed run keeps its first machine line and the wall time already spent."""
    results: dict[str, Any] = {"machine": common.machine_info(), "command": command_line(args), "quick": args.quick,
                               "epochs": args.epochs, "attacks": attack_list(args.attacks), "samples": args.samples,
                               "jobs": args.jobs, "threads": args.threads, "recipe": RECIPE, "rows": {}}
    results["settings"] = resolved(base_settings(args))  # the recipe with the run's budget (w4-p50's settings)
    state = out / "results.json"
    prev = json.loads(state.read_text()) if state.is_file() else {}
    same = all(prev.get(k) == results[k] for k in ("epochs", "attacks", "samples"))
    if same and prev.get("machine"):
        results["machine"] = prev["machine"]
    results["_wall_before"] = (prev.get("wall_s") or 0.0) if same else 0.0
    return results


# ----------------------------------------------------------------------------------------- rows kept in git
# The scratch folder lives as long as the machine; benchmarks/results.json is committed. So a finished row is kept
# there with its per-image scores (compact strings), and a later session on a fresh clone resumes the run where it
# stopped: a kept row is reused while its settings are unchanged (`spec_digest`), and the paired gaps against the
# yardstick come from the kept scores. Each row says when and on which CPU it was measured.


def spec_digest(spec: dict[str, Any]) -> str:
    """A row's settings (what it trains and how it is scored) as a hash that does not depend on where the
    repository is checked out."""
    text = json.dumps({k: spec[k] for k in ("train", "bench")}, sort_keys=True)
    for path, token in ((str(common.SCRATCH), "<scratch>"), (str(common.SHARED_DATA), "<data>")):
        text = text.replace(path, token)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_per_image(per: dict[str, list[int]]) -> dict[str, str]:
    """Per-image 0/1 scores as digit strings ('0110...'); the test indices as 'first-last' when contiguous."""
    idx = list(per["test_index"])
    contiguous = bool(idx) and idx == list(range(idx[0], idx[0] + len(idx)))
    out = {"test_index": f"{idx[0]}-{idx[-1]}" if contiguous else ",".join(map(str, idx))}
    for key, scores in per.items():
        if key != "test_index":
            if any(v not in (0, 1) for v in scores):
                raise ValueError(f"per-image {key} scores are not 0/1: the flagship's files are deterministic")
            out[key] = "".join(str(int(v)) for v in scores)
    return out


def unpack_per_image(packed: dict[str, str]) -> dict[str, list[int]]:
    idx = packed["test_index"]
    first, sep, last = idx.partition("-")
    index = list(range(int(first), int(last) + 1)) if sep else [int(v) for v in idx.split(",") if v]
    return {"test_index": index} | {k: [int(c) for c in v] for k, v in packed.items() if k != "test_index"}


def measured_on(when: float | None = None) -> dict[str, Any]:
    """Where and when a row was measured: this machine's CPU, and `when` (epoch seconds) or now."""
    from rcdeploy.runtime.cpu import cpu_kind

    m = common.machine_info()
    if when is not None:
        m["date_utc"] = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M")
    # the project's one classifier of what the int8 kernels compute here: "exact" (VNNI, AMX, ARM) or "avx2"
    return {k: m[k] for k in ("cpu", "cpu_count", "isa", "date_utc")} | {"int8_kernels": cpu_kind().isa}


def kept_results(results: dict[str, Any]) -> dict[str, Any]:
    """What benchmarks/results.json keeps: the figures and, per row, its settings' digest and its per-image
    scores packed (not the spec, the epoch history, or the scratch paths)."""
    rows = {}
    for name, r in ordered_rows(results):
        kept = {k: v for k, v in r.items() if k not in ("per_image", "spec", "history", "file", "run_dir")}
        if "per_image" in r and "spec" in r:
            kept |= {"spec_digest": spec_digest(r["spec"]), "per_image": pack_per_image(r["per_image"])}
        rows[name] = kept
    return results | {"rows": rows}


def kept_row(name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The row as an earlier session kept it in benchmarks/results.json, when its settings are the same."""
    try:
        r = json.loads(common.RESULTS.read_text())[KEY]["rows"][name]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if r.get("spec_digest") != spec_digest(spec) or "per_image" not in r or "measured" not in r:
        return None
    return r | {"per_image": unpack_per_image(r["per_image"]), "spec": spec}


# ----------------------------------------------------------------------------------------- output


def se_points(p_pct: float, n: int) -> float:
    """Binomial standard error of an accuracy, in points: sqrt(p (1 - p) / n)."""
    p = p_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def paired_gap(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of a - b over the same images, in points, and its standard error (paired)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return 100 * mean, 100 * math.sqrt(var / n)


def gap(results: dict[str, Any], name: str, key: str) -> tuple[float, float] | None:
    """(row - yardstick, SE) in points on `key` ('clean', 'pgd20', 'worst'), or None."""
    ref, row = results["rows"].get("yardstick") or {}, results["rows"].get(name) or {}
    if "per_image" not in ref or "per_image" not in row:
        return None
    if ref["per_image"]["test_index"] != row["per_image"]["test_index"]:
        return None
    return paired_gap(row["per_image"][key], ref["per_image"][key])


def _acc(v: Any, n: int) -> str:
    return f"{v:.1f} ± {se_points(v, n):.1f}" if isinstance(v, (int, float)) else "-"


def _gap(g: tuple[float, float] | None) -> str:
    return f"{g[0]:+.1f} ± {g[1]:.1f}" if g else "-"


def ordered_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The rows in the table's order (main rows, then levers), whatever order they finished or were reused in."""
    order = {n: i for i, n in enumerate(ROWS + tuple(LEVERS))}
    return sorted(results["rows"].items(), key=lambda kv: order.get(kv[0], len(order)))


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["row", "clean %", "PGD-20 %", "worst %", "Δ clean", "Δ PGD-20", "file B", "MMACs", "p50 ms b1",
               "p50 ms b64", "train s"]
    out = []
    for name, r in ordered_rows(results):
        if "failed" in r:
            out.append([TITLES.get(name, name), "FAILED"] + ["-"] * (len(headers) - 2))
            continue
        n, lat = r["samples"], (r.get("latency") or {}).get("p50_ms") or {}
        ref = name == "yardstick"
        out.append([TITLES.get(name, name), _acc(r["clean_acc_pct"], n), _acc(r["robust"].get("pgd20"), n),
                    _acc(r["worst_case_acc_pct"], n), "ref." if ref else _gap(gap(results, name, "clean")),
                    "ref." if ref else _gap(gap(results, name, "pgd20")), f"{r['file_bytes']:,}",
                    f"{r['macs'] / 1e6:.1f}" if isinstance(r.get("macs"), (int, float)) else "-",
                    f"{lat['1']:.2f}" if "1" in lat else "-", f"{lat['64']:.1f}" if "64" in lat else "-",
                    f"{r['train_time_s']:.0f}"])
    return headers, out


def goal_gaps(results: dict[str, Any], name: str) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(clean gap, PGD-20 gap) of a row against the yardstick, or None when either is not measured."""
    c, p = gap(results, name, "clean"), gap(results, name, "pgd20")
    return None if c is None or p is None else (c, p)


def verdict(results: dict[str, Any]) -> str:
    """Item 2 of the issue, from the measured figures: the w4-p50 row, then each lever."""
    g = goal_gaps(results, "w4-p50")
    if g is None:
        return "Goal (4-bit, 50%-channel file within 3 points of the yardstick on clean and PGD-20): not measured " \
               "(needs both the yardstick and w4-p50 rows)."
    (c, p), ref, row = g, results["rows"]["yardstick"], results["rows"]["w4-p50"]
    met = c[0] >= -GOAL_POINTS and p[0] >= -GOAL_POINTS
    line = (f"Goal (the 4-bit, 50%-channel deployed file within {GOAL_POINTS:g} points of the same-run float "
            f"yardstick on clean AND PGD-20): **{'met' if met else 'not met'}** by the recipe: clean "
            f"{row['clean_acc_pct']:.1f}% vs {ref['clean_acc_pct']:.1f}% ({c[0]:+.1f} ± {c[1]:.1f} points), PGD-20 "
            f"{row['robust']['pgd20']:.1f}% vs {ref['robust']['pgd20']:.1f}% ({p[0]:+.1f} ± {p[1]:.1f} points), on "
            f"{row['samples']} test images.")
    levers = [(n, goal_gaps(results, n)) for n in LEVERS if "samples" in results["rows"].get(n, {})]
    met_by = [n for n, lg in levers if lg and lg[0][0] >= -GOAL_POINTS and lg[1][0] >= -GOAL_POINTS]
    if levers:
        line += (f" Levers that meet it: {', '.join(met_by)}." if met_by else " No lever tried meets it.")
    return line


INTRO = """
Every row trained from scratch by this command at the same budget: {epochs} epoch(s) on {train} training images of
the slice ({val_pct:g}% of its training split held out, seeded and stratified, for choosing the checkpoint: the
epoch with the best ({val_attack}, clean) validation accuracy on {val_n} of them), batch {batch}, FGSM-RS at eps
{eps} (uniform start, one step of 1.25 eps), SGD momentum {momentum:g} Nesterov, weight decay {wd:g}, one-cycle
learning rate with peak {lr:g} (torch's OneCycleLR defaults: pct_start {pct:g}, cosine, div {div:g}, final div
{final:g}; momentum not cycled; rcdeploy `--schedule onecycle` is the same curve step for step). yardstick: a
standard CIFAR ResNet-20 (16/32/64 channels, 1x1-conv shortcuts) in plain torch.nn trained by the script's own loop
(weight decay on every parameter, as plain PyTorch does; rcdeploy exempts BatchNorm and biases), exported to a
float ONNX file. rcdeploy rows: recipe `{recipe}` ({bits}-bit weights, first conv and classifier {fl}-bit,
{act}-bit activations, {sparsity} `--prune-channels {prune:g}`, mask fixed for the last {ft:g}% of the epochs);
`float` trains float weights (`--bits float`, first/last {fl}-bit) and is deployed as the int8 file (weights
post-training quantized at export: rcdeploy's integer ONNX has no float layers); `w4` is the recipe with
`--prune-channels 0`; `w4-p50` the recipe as it is, exported with `prune_channels=True`. Rows marked `lever`
are item 2's levers: each the `w4-p50` row with one change, trained at the same budget, exported the same way and
scored on clean and PGD-20 only (the goal's two figures; their worst is over those two). ARD distills this run's
`float` row (T 30, alpha 1: the reference code's defaults) with a 2-step inner attack of 2.5 eps / 2 (ours, for the
budget; the paper uses 10 steps); TRADES uses beta 6 and the same 2-step attack; `mixed` weighs the clean loss 0.3
and the adversarial one 0.7 (ours), its adversarial images one step of 1.25 eps from a uniform start (FGSM-RS's).
|
Scored by `rcdeploy.deploy.bench.bench_model` on each deployed file (onnxruntime) on {samples} test images at eps
{eps}: clean, {attacks}, as AutoAttack's standard cascade: PGD-20 on every image, then each further attack
(straight-through ones first, then the smooth surrogate's, then black box) only on the images every earlier one
failed on; worst = per image over clean and every attack, the same figure as every attack on every image.
± is the binomial standard error
sqrt(p(1-p)/n); Δ is the row minus the yardstick in points on the same images, ± the paired standard error of the
per-image differences. MMACs from onnxruntime's optimized graph; p50 latency of bench's `cpu` target (onnxruntime,
{lat_threads} threads) at batch 1 and 64, measured after the session's training, one file at a time (shared
machine: scale only). A run resumed in a later session (on a fresh clone) reuses the rows benchmarks/results.json
keeps, with their per-image scores, while their settings are unchanged; each row says when and where it was
measured. train s: training seconds summed over epochs ({jobs} row(s) at a time, {threads} thread(s) each), without
the per-epoch validation.
"""


def intro_text(results: dict[str, Any], samples: int) -> str:
    """INTRO formatted from the run's own settings."""
    from rcdeploy.train.loop import ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_PCT_START

    s = results["settings"]
    val_n = "all" if s["val_samples"] is None else f"up to {s['val_samples']}"
    lat_threads = next((r["latency"].get("threads") for r in results["rows"].values() if r.get("latency")),
                       "its default")
    return INTRO.format(
        epochs=results["epochs"], train=s.get("train_samples") or "all the remaining", val_pct=100 * s["val_fraction"],
        val_attack=s["val_attack"], val_n=val_n, batch=s["batch_size"], eps=f"{round(s['eps'] * 255)}/255",
        momentum=s["momentum"], wd=s["weight_decay"], lr=s["lr"], pct=ONECYCLE_PCT_START, div=ONECYCLE_DIV,
        final=ONECYCLE_FINAL_DIV, recipe=results["recipe"], bits=s["bits"], fl=s["first_last_bits"],
        act=s["act_bits"], sparsity=s["sparsity"], prune=s["prune_channels"], ft=100 * s["finetune_fraction"],
        samples=samples, attacks=", ".join(results["attacks"].split(",")), lat_threads=lat_threads,
        jobs=results["jobs"], threads=max(1, results["threads"] // max(1, results["jobs"])))


def markdown(results: dict[str, Any]) -> str:
    first = next((r for r in results["rows"].values() if "samples" in r), None)
    samples = first["samples"] if first else (results["samples"] or 932)
    lines = ["## Flagship: a 4-bit, 50%-channel ResNet-20 file vs a PyTorch float yardstick (CIFAR-10 slice)", "",
             f"Machine: {common.machine_line(results['machine'])}. `{results['command']}`"
             f"{' (smoke run, not for quoting)' if results['quick'] else ''}; wall "
             f"{results.get('wall_s', 0) / 60:.0f} min.", ""]
    lines += [" ".join(p.split()) + "\n" for p in intro_text(results, samples).strip().split("\n|\n")]
    lines += [common.markdown_table(*table(results)), verdict(results), ""]
    return "\n".join(lines + row_notes(results)) + "\n"


def cascade_text(r: dict[str, Any]) -> str:
    """'robust after each attack of the cascade (images it broke first)'."""
    after, broke = r.get("robust_after") or r["robust"], r.get("broke_first") or {}
    steps = [f"{a} {v:.1f}%" + (f" ({broke[a]} broken first)" if a in broke else "") for a, v in after.items()]
    return "robust after each attack in turn: " + " > ".join(steps)


def kernel_kind(measured: dict[str, Any]) -> str:
    """What the row's CPU's int8 kernels are (rcdeploy.runtime.cpu's "exact" or "avx2"), in words."""
    kind = measured.get("int8_kernels")
    return {"exact": "int8 kernels exact", "avx2": "AVX2: int8 pair sums saturate at int16"}.get(kind, "kernels ?")


def row_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for name, r in ordered_rows(results):
        if "failed" in r:
            notes.append(f"- {TITLES.get(name, name)}: failed: {r['failed']}")
            continue
        best = r.get("best") or {}
        extra = [f"best epoch {best.get('epoch')} (validation clean {best.get('val_clean_acc', float('nan')):.1f}%, "
                 f"robust {best.get('val_robust_acc', float('nan')):.1f}%)",
                 cascade_text(r),
                 f"bench {r['bench_s'] / 60:.1f} min"]
        if name == "yardstick":
            pt, chk = r.get("pytorch") or {}, r.get("export_check") or {}
            extra.append(f"in PyTorch on the same images: clean {pt.get('clean_acc_pct', float('nan')):.1f}%, "
                         f"PGD-20 {pt.get('pgd20_acc_pct', float('nan')):.1f}%; float ONNX vs PyTorch on "
                         f"{chk.get('images')} validation images: top-1 agreement "
                         f"{chk.get('top1_agreement_pct', float('nan')):.1f}%, max |logit diff| "
                         f"{chk.get('max_abs_logit_diff', float('nan')):.2g}")
        kept = r.get("channels_kept")
        if isinstance(kept, dict) and name == "w4-p50":
            extra.append(f"output channels kept in the file {sum(kept.values())}")
        if m := r.get("measured"):
            extra.append(f"measured {m['date_utc']} UTC on {m['cpu']} ({kernel_kind(m)})")
        extra += [f"flag: {f}" for f in r.get("flags") or []]
        notes.append(f"- {TITLES.get(name, name)}: " + "; ".join(extra) + ".")
    kinds = {kernel_kind(r["measured"]) for r in results["rows"].values() if r.get("measured")}
    if len(kinds) > 1:
        notes.append(f"- rows measured on more than one CPU kind ({'; '.join(sorted(kinds))}): accuracies are the "
                     "same on both (the files are exact integer programs), latencies compare only within one kind.")
    missing = [n for n in ROWS + tuple(LEVERS) if n not in results["rows"]]
    if missing:
        notes.append(f"- not run: {', '.join(missing)}.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
