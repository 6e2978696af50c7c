"""The fit loop: adversarial QAT with optional structured sparsity, exact resume, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rcdeploy
from rcdeploy.attacks import parse_attack
from rcdeploy.config import TrainConfig, config_from_dict, dump_yaml
from rcdeploy.data import Dataset, Split, augment, iterate_batches, load_dataset
from rcdeploy.errors import UsageError
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.presets import ACT_CALIBRATION_STEPS
from rcdeploy.quant.spec import QuantSpec
from rcdeploy.train.checkpoint import FORMAT, VERSION, atomic_save, build_model, load_checkpoint, model_spec
from rcdeploy.train.objectives import OBJECTIVES, AdvSettings


class Reporter:
    """What the loop tells the outside world; the CLI renders it (progress bar, epoch lines)."""

    def start_epoch(self, epoch: int, epochs: int, batches: int, skip: int = 0) -> None: ...
    def batch(self, loss: float, images: int) -> None: ...
    def end_epoch(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    interrupted: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def batch_generator(seed: int, epoch: int, batch: int, device: torch.device) -> torch.Generator:
    """A generator per (seed, epoch, batch): any batch replays identically, so resume is exact."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + batch) % (2**63 - 1))
    return g


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at `progress` (epochs done, fractional)."""
    if cfg.warmup_epochs and progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    frac = progress / cfg.epochs
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    if cfg.schedule == "piecewise":
        return cfg.lr * cfg.gamma ** sum(frac >= m for m in cfg.milestones)
    return cfg.lr


def adv_settings(cfg: TrainConfig, default_eps: float) -> AdvSettings:
    eps = float(cfg.eps) if cfg.eps is not None else default_eps
    step = float(cfg.step_size) if cfg.step_size is not None else 2.5 * eps / cfg.steps
    return AdvSettings(eps=eps, steps=cfg.steps, step_size=step, beta=cfg.beta)


def model_kwargs(cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    meta = data.meta
    kw: dict[str, Any] = {"num_classes": meta.num_classes, "in_chans": meta.shape[0], "mean": list(meta.mean),
                          "std": list(meta.std), "input_size": meta.shape[1]}
    if cfg.width is not None:
        kw["width"] = cfg.width
    kw.update(cfg.model_args)
    return kw


def quant_spec(cfg: TrainConfig) -> QuantSpec:
    return QuantSpec(bits=cfg.bits, act_bits=cfg.act_bits, first_last_bits=cfg.first_last_bits,
                     overrides=dict(cfg.bit_overrides))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on learned quantizer scales and BN affine: decay would only shrink ranges.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "scaling_impl" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> float:
    """Correct predictions, averaged over `draws` forward passes (one for a deterministic model)."""
    return sum(int((model(x).argmax(1) == y).sum()) for _ in range(draws)) / draws


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500, draws: int = 1) -> float:
    return sum(_correct(model, x[i:i + batch], y[i:i + batch], draws) for i in range(0, len(x), batch))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_name: str, eps: float,
             seed: int = 0, batch: int = 500, eot: int = 1) -> dict[str, float]:
    """Clean and robust accuracy (in %) of `model` on (x, y) under `attack_name` at `eps`.

    eot: for stochastic models, the attack averages its gradients over `eot` draws and both accuracies
    are the mean over `eot` forward passes (expectation over transformation).
    """
    was_training = model.training
    model.eval()
    try:
        attack = parse_attack(attack_name, eps=eps, seed=seed, eot=eot)
        clean = _clean_correct(model, x, y, batch, eot)
        robust = 0.0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            x_adv = attack(model, xb, yb)
            robust += _correct(model, x_adv, yb, eot)
    finally:
        model.train(was_training)
    n = max(1, len(x))
    return {"clean_acc": 100.0 * clean / n, "robust_acc": 100.0 * robust / n}


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between batches and saves before leaving."""

    def __init__(self) -> None:
        self.set = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.set = True

        try:
            for s in previous:
                signal.signal(s, handler)
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None


def _new_run_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    _check_writable(out)
    name = cfg.name or "-".join(filter(None, [
        cfg.model, cfg.dataset.replace("folder:", "").replace("/", "_"), f"w{cfg.bits}", cfg.adv,
        f"p{round(cfg.prune_channels * 100)}" if cfg.prune_channels else "", datetime.now().strftime("%Y%m%d-%H%M%S")]))
    run_dir = out / name
    if cfg.name is None:
        k = 1
        while run_dir.exists():
            k += 1
            run_dir = out / f"{name}-{k}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, latest)
    except OSError:  # file systems without symlinks: a text pointer instead
        tmp.unlink(missing_ok=True)
        (run_dir.parent / "latest.txt").write_text(str(run_dir.resolve()) + "\n")


def finetune_epoch(cfg: TrainConfig) -> int:
    """First epoch of the fixed-mask fine-tune phase (the last `finetune_fraction` of training)."""
    return cfg.epochs - int(round(cfg.epochs * cfg.finetune_fraction))


def _sparsity_for(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    from rcdeploy.train.unstructured import UNSTRUCTURED

    if cfg.sparsity in UNSTRUCTURED:  # weight sparsity: on whenever named (rvsm needs no target)
        if cfg.prune_channels:
            raise UsageError(f"--sparsity {cfg.sparsity} prunes single weights, not channels: pass --prune-weights "
                             "instead of --prune-channels (or use group-lasso, rgsm or slimming for channels)")
        target = cfg.prune_weights
    elif not cfg.prune_channels:
        return None
    else:
        target = cfg.prune_channels
    from rcdeploy.train.sparsity import create_sparsity

    return create_sparsity(cfg.sparsity, model, target=target, channel_multiple=cfg.channel_multiple,
                           epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                           finetune_at=finetune_epoch(cfg) / cfg.epochs, **cfg.sparsity_params)


def _plugins_for(cfg: TrainConfig, model: nn.Module) -> list[Any]:
    """Per-epoch training plugins (today: Binary-Relax). A plugin has `name`, `start_epoch(model, epoch)`,
    `lr_factor(epoch)`, `eligible(epoch)` (may this epoch become best.pt), `stats()`, `state_dict()`,
    `load_state_dict(state)` and `remove()` (undo what it did to the model)."""
    if cfg.quant_method == "binary-relax":
        from rcdeploy.quant.binary_relax import BinaryRelax

        return [BinaryRelax(model, epochs=cfg.epochs, lam=cfg.br_lambda, growth=cfg.br_growth,
                            exact_fraction=cfg.br_exact_fraction, exact_lr=cfg.br_exact_lr)]
    return []


def _train_subset(cfg: TrainConfig, data: Dataset) -> Dataset:
    """The first `train_samples` images of a seeded permutation of the training split (stratified enough)."""
    if cfg.train_samples is None or int(cfg.train_samples) >= len(data.train):
        return data
    g = torch.Generator().manual_seed(cfg.seed * 31 + 17)
    idx = torch.randperm(len(data.train), generator=g)[:int(cfg.train_samples)].to(data.train.x.device)
    return dataclasses.replace(data, train=Split(data.train.x[idx], data.train.y[idx]))


def fit(cfg: TrainConfig, **kwargs: Any) -> RunResult:
    """Train per `cfg` (see `_fit`), with torch's thread count set for the run and restored after."""
    previous = torch.get_num_threads()
    try:
        return _fit(cfg, **kwargs)
    finally:
        torch.set_num_threads(previous)


def _fit(cfg: TrainConfig, *, resume: str | Path | None = None, reporter: Reporter | None = None,
        stop_at: tuple[int, int] | None = None) -> RunResult:
    """Train per `cfg` (or continue the run `resume` points at); returns where it wrote and what it measured.

    `stop_at=(epoch, batch)` interrupts exactly there, as a signal would (used by the resume test).
    """
    reporter = reporter or Reporter()
    ckpt = None
    if resume is not None:
        path = Path(resume)
        path = path / "last.pt" if path.is_dir() else path
        ckpt = load_checkpoint(path)
        saved = config_from_dict(ckpt["config"])
        saved.epochs = cfg.epochs if cfg.epochs != saved.epochs and cfg.epochs > saved.epochs else saved.epochs
        saved.device = cfg.device
        cfg = saved.validate()
        run_dir = path.parent
    else:
        cfg.validate()
        run_dir = None

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, device=device,
                        val_fraction=cfg.val_fraction, seed=cfg.seed)
    data = _train_subset(cfg, data)
    settings = adv_settings(cfg, data.meta.default_eps)
    objective = OBJECTIVES[cfg.adv]
    batches_per_epoch = math.ceil(len(data.train) / cfg.batch_size)

    if ckpt is None:
        spec = model_spec(cfg.model, quant_spec(cfg), **model_kwargs(cfg, data))
        model = build_model(spec).to(device)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        calib = [x for x, _ in iterate_batches(data.train, cfg.batch_size, shuffle=True, generator=g)]
        calibrate_activations(model, (calib * ACT_CALIBRATION_STEPS)[:ACT_CALIBRATION_STEPS])
        sparsity = _sparsity_for(cfg, model, batches_per_epoch)  # before the run folder: a bad name must leave nothing behind
        plugins = _plugins_for(cfg, model)
        run_dir = _new_run_dir(cfg)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "metrics.jsonl").write_text("")
    else:
        spec = ckpt["model"]
        model = build_model(spec).to(device)
        model.load_state_dict(ckpt["state_dict"])
        sparsity = _sparsity_for(cfg, model, batches_per_epoch)
        plugins = _plugins_for(cfg, model)
        for p in plugins:
            state = (ckpt.get("plugins_state") or {}).get(p.name)
            if state is not None:
                p.load_state_dict(state)
    _point_latest(run_dir)

    optimizer = make_optimizer(cfg, model)
    finetune_start = finetune_epoch(cfg) if sparsity else 0
    start_epoch, start_batch, history, best = 0, 0, [], None
    partial = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if sparsity is not None and ckpt.get("sparsity_state") is not None:
            sparsity.load_state_dict(ckpt["sparsity_state"])
        start_epoch, start_batch = ckpt["position"]
        history, best = list(ckpt.get("history", [])), ckpt.get("best")
        partial = dict(ckpt.get("partial_epoch") or partial)

    val_n = len(data.val) if cfg.val_samples is None else min(cfg.val_samples, len(data.val))
    val_x, val_y = data.val.x[:val_n], data.val.y[:val_n]
    result = RunResult(run_dir=run_dir, metrics=history, best=best)

    def save(name: str, epoch: int, batch: int, part: dict | None) -> None:
        atomic_save({
            "format": FORMAT, "version": VERSION, "rcdeploy": rcdeploy.__version__,
            "model": spec, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sparsity_state": sparsity.state_dict() if sparsity else None,
            "sparsity": sparsity.stats(model) if sparsity else None,
            "plugins_state": {p.name: p.state_dict() for p in plugins},
            "config": cfg.to_dict(), "dataset": data.meta.to_dict(), "position": [epoch, batch],
            "partial_epoch": part, "history": history, "best": best,
            "metrics": history[-1] if history else {}, "eps": settings.eps,
        }, run_dir / name)

    stop = _StopFlag()
    with stop.installed():
        for epoch in range(start_epoch, cfg.epochs):
            if sparsity is not None and epoch == finetune_start and start_batch == 0:
                sparsity.start_finetune(model)
            for p in plugins:
                p.start_epoch(model, epoch)
            lr_factor = math.prod(p.lr_factor(epoch) for p in plugins)
            model.train()
            perm_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            order = torch.randperm(len(data.train), generator=perm_gen).to(device)
            reporter.start_epoch(epoch, cfg.epochs, batches_per_epoch, start_batch)
            t0 = time.perf_counter()
            for b in range(start_batch, batches_per_epoch):
                if stop.set or (stop_at is not None and (epoch, b) == tuple(stop_at)):
                    partial["time"] += time.perf_counter() - t0
                    save("last.pt", epoch, b, partial)
                    result.interrupted = True
                    return result
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                gen = batch_generator(cfg.seed, epoch, b, device)
                x = augment(data.train.x[idx], data.meta, gen)
                y = data.train.y[idx]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, epoch + b / batches_per_epoch) * lr_factor
                loss, logits = objective(model, x, y, settings, gen)
                if sparsity is not None:
                    extra = sparsity.penalty(model)
                    if extra is not None:
                        loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if sparsity is not None:
                    sparsity.after_step(model, optimizer.param_groups[0]["lr"])
                loss_value = float(loss.detach())
                partial["loss"] += loss_value * len(y)
                partial["correct"] += int((logits.argmax(1) == y).sum())
                partial["seen"] += len(y)
                reporter.batch(loss_value, len(y))
            start_batch = 0
            if sparsity is not None:
                sparsity.end_epoch(model, epoch, cfg.epochs)
            train_time = partial["time"] + time.perf_counter() - t0
            ev = evaluate(model, val_x, val_y, cfg.val_attack, settings.eps, seed=cfg.seed, eot=cfg.eot)
            metrics = {
                "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": partial["loss"] / max(1, partial["seen"]),
                "train_acc": 100.0 * partial["correct"] / max(1, partial["seen"]),
                "val_clean_acc": ev["clean_acc"], "val_robust_acc": ev["robust_acc"], "val_attack": cfg.val_attack,
                "eps": settings.eps, "img_per_s": partial["seen"] / max(train_time, 1e-9), "train_time_s": train_time,
                "phase": "finetune" if sparsity is not None and epoch >= finetune_start else (
                    "sparsify" if sparsity is not None else "train"),
            }
            if sparsity is not None:
                metrics["sparsity"] = sparsity.stats(model)
            for p in plugins:
                metrics[p.name] = p.stats()
            history.append(metrics)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            partial = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
            # With sparsity on, only mask-fixed (fine-tune phase) epochs may become best.pt: an earlier,
            # denser model would make `export --prune-channels` remove nothing.
            eligible = (sparsity is None or epoch >= finetune_start) and all(p.eligible(epoch) for p in plugins)
            key = (ev["robust_acc"], ev["clean_acc"])
            if eligible and (best is None or key > (best["val_robust_acc"], best["val_clean_acc"])):
                best = dict(metrics)
                result.best = best
                save("best.pt", epoch + 1, 0, None)
            save("last.pt", epoch + 1, 0, None)
            reporter.end_epoch(metrics)
    result.best = best
    return result

