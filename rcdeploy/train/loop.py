"""The fit loop: adversarial QAT with optional structured sparsity, exact resume, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rcdeploy
from rcdeploy.attacks import parse_attacks
from rcdeploy.config import (
    AUTO_BITS,
    TrainConfig,
    check_distillation,
    check_scale_out,
    dump_yaml,
    resume_config,
)
from rcdeploy.data import Dataset, Split, augment, iterate_batches, load_dataset
from rcdeploy.distributed import World, env_rank, local_device, unwrap
from rcdeploy.errors import UsageError
from rcdeploy.io import atomic_write_text
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.presets import ACT_CALIBRATION_STEPS
from rcdeploy.quant.spec import QuantSpec
from rcdeploy.robustness import attack_batches, chunk_seed, chunks, owned
from rcdeploy.train.checkpoint import (
    FORMAT,
    VERSION,
    atomic_save,
    build_model,
    load_checkpoint,
    load_weights,
    model_spec,
)
from rcdeploy.train.objectives import OBJECTIVES, AdvSettings
from rcdeploy.train.rundir import check_new_run, locked, new_run, point_latest, run_name
from rcdeploy.train.scaleout import (
    BatchNormAverager,
    batches_per_epoch,
    micro_key,
    micro_slices,
    mine,
    no_sync,
    threads_per_rank,
    wrap,
)
from rcdeploy.train.teacher import load_teacher
from rcdeploy.train.unstructured import sparsity_report


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
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # resume: setting -> (run's, given)
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def batch_generator(seed: int, epoch: int, batch: int, device: torch.device, micro: int = 0) -> torch.Generator:
    """A generator per (seed, epoch, batch, micro-batch): any micro-batch replays identically on any rank,
    so resume is exact and N ranks compute what one process computes."""
    g = torch.Generator(device=device)
    g.manual_seed(micro_key(seed, epoch, batch, micro))
    return g


def lr_at(cfg: TrainConfig, progress: float, steps_per_epoch: int | None = None) -> float:
    """Learning rate at `progress` (epochs done, fractional); `steps_per_epoch` (optimizer steps per epoch)
    makes `onecycle` step-exact (the trainer passes it; without it, onecycle is its many-steps limit)."""
    if cfg.warmup_epochs and progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    frac = progress / cfg.epochs
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    if cfg.schedule == "piecewise":
        return cfg.lr * cfg.gamma ** sum(frac >= m for m in cfg.milestones)
    if cfg.schedule == "onecycle":
        return onecycle_lr(cfg.lr, progress, cfg.epochs, steps_per_epoch)
    return cfg.lr


ONECYCLE_PCT_START, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # torch OneCycleLR's defaults


def onecycle_lr(peak: float, progress: float, epochs: int, steps_per_epoch: int | None = None) -> float:
    """torch.optim.lr_scheduler.OneCycleLR(max_lr=peak, total_steps=epochs * steps_per_epoch), its defaults
    (pct_start 0.3, anneal_strategy cos, div_factor 25, final_div_factor 1e4, two phases; momentum is not
    cycled here): cosine from peak/25 up to peak over the first 30% of the steps, then cosine down to
    peak/25/1e4. Step s = progress * steps_per_epoch; without steps_per_epoch the fraction of training done
    stands for it (the curve torch's approaches as the steps grow)."""
    start, end = peak / ONECYCLE_DIV, peak / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
    if steps_per_epoch:
        total = epochs * steps_per_epoch
        step, up = min(float(round(progress * steps_per_epoch)), total - 1.0), ONECYCLE_PCT_START * total - 1
        down = total - 1.0
    else:
        step, up, down = min(progress / epochs, 1.0), ONECYCLE_PCT_START, 1.0
    if step <= up:
        lo, hi, pct = start, peak, step / up if up > 0 else 1.0
    else:
        lo, hi, pct = peak, end, (step - up) / (down - up)
    return hi + (lo - hi) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def adv_settings(cfg: TrainConfig, default_eps: float, teacher: nn.Module | None = None) -> AdvSettings:
    eps = float(cfg.eps) if cfg.eps is not None else default_eps
    step = float(cfg.step_size) if cfg.step_size is not None else 2.5 * eps / cfg.steps
    return AdvSettings(eps=eps, steps=cfg.steps, step_size=step, beta=cfg.beta, alpha=cfg.alpha,
                       temperature=cfg.distill_temperature, teacher=teacher)


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
def _correct_each(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """Per sample, the fraction of `draws` forward passes that classify it right."""
    return sum((model(x).argmax(1) == y).double() for _ in range(draws)) / draws


def validation_attacks(names: str, eps: float, seed: int = 0, eot: int = 1) -> list[Any]:
    """The attacks `val_attack` names (one name, a comma list or a preset such as autoattack-fast).

    Validation attacks the PyTorch model with its own gradients; `@smooth` names the surrogate of an
    exported graph, which only bench has, so it is refused here rather than silently ignored.
    """
    attacks = parse_attacks(names, eps=eps, seed=seed, eot=eot)
    for a in attacks:
        if a.gradients != "ste":
            raise UsageError(f"val_attack {names!r}: {a.name} takes the gradients of an exported graph's smooth "
                             "surrogate, which only bench has; validation attacks the PyTorch model (drop "
                             f"'@{a.gradients}')")
    return attacks


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_name: str, eps: float,
             seed: int = 0, batch: int = 500, eot: int = 1, world: World | None = None) -> dict[str, float]:
    """Clean and robust accuracy (in %) of `model` on (x, y) under `attack_name` at `eps`.

    eot: for stochastic models, the attack averages its gradients over `eot` draws and both accuracies
    are the mean over `eot` forward passes (expectation over transformation).

    The images go in chunks of `batch`; each chunk's attack starts and model noise are seeded by the chunk
    alone (`robustness.chunk_seed`), so with a `world` of N ranks each rank takes every N-th chunk and the
    per-image results, summed over ranks, are those of one process. Robust accuracy is accuracy under the
    attack; with several (a comma list or a preset such as autoattack-fast), per sample the worst over
    them, as bench counts it (bench adds clean to the minimum).
    """
    world = world or World()
    was_training = model.training
    model.eval()
    try:
        attacks = validation_attacks(attack_name, eps, seed=seed, eot=eot)
        scores = torch.zeros(2, len(x), dtype=torch.float64)  # clean, worst under attack
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            for c, part in owned(chunks(len(x), batch), world.rank, world.size):
                scores[:, part] = _chunk_scores(model, x[part], y[part], attacks, seed, c, eot)
        world.sum_(scores)
    finally:
        model.train(was_training)
    n = max(1, len(x))
    return {"clean_acc": 100.0 * float(scores[0].sum()) / n, "robust_acc": 100.0 * float(scores[1].sum()) / n}


def _chunk_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[Any], seed: int, chunk: int,
                  eot: int) -> torch.Tensor:
    """[clean, worst over attacks] per image of one chunk, every random draw seeded by the chunk."""
    torch.manual_seed(chunk_seed(seed, chunk))  # a stochastic model's noise
    clean = _correct_each(model, x, y, eot).cpu()
    worst = torch.ones(len(x), dtype=torch.float64)
    for k, attack in enumerate(attacks):
        attack.reseed(chunk_seed(seed + k + 1, chunk))
        for _, x_adv in attack_batches(attack, model, x, y, len(x)):
            worst = torch.minimum(worst, _correct_each(model, x_adv, y, eot).cpu())
    return torch.stack([clean, worst])


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between batches and saves before leaving.

    `stop_at=(epoch, batch)` stops exactly there, as a signal would (used by the resume tests).
    """

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        self.set = False
        self.stop_at = None if stop_at is None else tuple(stop_at)

    def due(self, epoch: int, batch: int) -> bool:
        return self.set or (epoch, batch) == self.stop_at

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


def finetune_epoch(cfg: TrainConfig) -> int:
    """First epoch of the fixed-mask fine-tune phase (the last `finetune_fraction` of training).

    It can equal `cfg.epochs` (one epoch, or a fraction that rounds to none): the mask is then fixed
    after the last epoch's training instead, so best.pt always comes from a mask-fixed model.
    """
    if cfg.low_rank is not None:  # low rank chooses ranks for the channels that remain: the mask is fixed then
        from rcdeploy.train.lowrank import phase_epochs

        start = phase_epochs(cfg.epochs, cfg.rank_admm_at, cfg.rank_swap_at)[0]
        if start < 1:
            raise UsageError(f"--low-rank with --prune-channels needs a sparse epoch before the ADMM phase: "
                             f"rank_admm_at {cfg.rank_admm_at} of {cfg.epochs} epochs starts it at epoch 0")
        return start
    return cfg.epochs - int(round(cfg.epochs * cfg.finetune_fraction))


def _sparsity_for(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    from rcdeploy.train.unstructured import UNSTRUCTURED

    params = dict(cfg.sparsity_params)
    if cfg.codebook_bits is not None and cfg.sparsity != "atmc":
        raise UsageError(f"--codebook-bits is a setting of --sparsity atmc, not of {cfg.sparsity}")
    if cfg.sparsity in UNSTRUCTURED:  # weight sparsity: on whenever named (rvsm needs no target)
        if cfg.prune_channels:
            raise UsageError(f"--sparsity {cfg.sparsity} prunes single weights, not channels: pass --prune-weights "
                             "instead of --prune-channels (or use group-lasso, rgsm or slimming for channels)")
        target = cfg.prune_weights
        if cfg.codebook_bits is not None:
            params["codebook_bits"] = cfg.codebook_bits
    elif not cfg.prune_channels:
        return None
    else:
        target = cfg.prune_channels
    from rcdeploy.train.sparsity import create_sparsity

    return create_sparsity(cfg.sparsity, model, target=target, channel_multiple=cfg.channel_multiple,
                           epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                           finetune_at=finetune_epoch(cfg) / cfg.epochs, **params)


def _plugins_for(cfg: TrainConfig, model: nn.Module, sparsity: Any = None) -> list[Any]:
    """Per-epoch training plugins (today: Binary-Relax). A plugin has `name`, `start_epoch(model, epoch)`,
    `lr_factor(epoch)`, `eligible(epoch)` (may this epoch become best.pt), `stats()`, `state_dict()`,
    `load_state_dict(state)` and `remove()` (undo what it did to the model)."""
    if cfg.quant_method == "binary-relax":
        from rcdeploy.quant.binary_relax import BinaryRelax

        return [BinaryRelax(model, epochs=cfg.epochs, lam=cfg.br_lambda, growth=cfg.br_growth,
                            exact_fraction=cfg.br_exact_fraction, exact_lr=cfg.br_exact_lr)]
    if cfg.low_rank is not None:  # CSTAR; it may also have `penalty(model)` and `end_epoch(model, epoch)`
        from rcdeploy.train.lowrank import LowRank

        return [LowRank(model, quant_spec(cfg), epochs=cfg.epochs, ratio=float(cfg.low_rank), rho=cfg.rank_rho,
                        admm_at=cfg.rank_admm_at, swap_at=cfg.rank_swap_at, multiple=cfg.channel_multiple,
                        sparsity=sparsity)]
    return []


def _train_subset(cfg: TrainConfig, data: Dataset) -> Dataset:
    """The first `train_samples` images of a seeded permutation of the training split (stratified enough)."""
    if cfg.train_samples is None or int(cfg.train_samples) >= len(data.train):
        return data
    g = torch.Generator().manual_seed(cfg.seed * 31 + 17)
    idx = torch.randperm(len(data.train), generator=g)[:int(cfg.train_samples)].to(data.train.x.device)
    return dataclasses.replace(data, train=Split(data.train.x[idx], data.train.y[idx]))


def fit(cfg: TrainConfig | None, *, resume: str | Path | None = None, overrides: dict[str, Any] | None = None,
        reporter: Reporter | None = None, stop_at: tuple[int, int] | None = None) -> RunResult:
    """Train per `cfg`, or continue the run `resume` points at (its folder or its last.pt).

    With `resume`, `cfg` is ignored: the run continues with its own settings, changed only by the
    `overrides` the user gave (config.RESUME_SETTINGS), which `RunResult.changed` lists.
    `stop_at=(epoch, batch)` interrupts exactly there, as a signal would (used by the resume test).
    torch's thread count is set for the run and restored after.
    """
    previous = torch.get_num_threads()
    main = env_rank() == 0  # in a job, rank 0 alone writes the run folder
    restarted = _restarted_run(cfg, main) if resume is None else None
    if restarted is not None:
        resume, overrides = restarted, None
        notes = [f"a worker failed; the job restarted (restart {os.environ['TORCHELASTIC_RESTART_COUNT']}) and "
                 f"resumed the run from {restarted / 'last.pt'}"]
    try:
        with ExitStack() as stack:
            if resume is None:
                assert cfg is not None, "fit needs a config or a run to resume"
                _check_new(cfg, main)
                return _fit(cfg, None, None, {}, stack, reporter or Reporter(), stop_at)
            run_dir, path = _resume_paths(resume)
            _resume_settings(path, overrides)  # a bad file or setting fails before the folder is touched
            if main:
                stack.enter_context(locked(run_dir))  # a second writer is refused
            ckpt = load_checkpoint(path)  # again, under the lock: what a writer that just finished left
            cfg, changed = _resume_settings(path, overrides, ckpt)
            result = _fit(cfg, ckpt, run_dir, changed, stack, reporter or Reporter(), stop_at)
            result.notes[:0] = notes if restarted is not None else []
            return result
    finally:
        torch.set_num_threads(previous)


def _restarted_run(cfg: TrainConfig | None, main: bool) -> Path | None:
    """After an elastic restart (a worker died and `--max-restarts` allowed another attempt) the job continues
    its own run from last.pt instead of starting a new one; a first attempt that died before its first
    checkpoint left a folder without one, which rank 0 clears for the new attempt."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or cfg is None or cfg.name is None:
        return None
    run_dir = Path(cfg.out) / cfg.name
    if (run_dir / "last.pt").is_file():
        return run_dir
    if main and run_dir.is_dir() and not (run_dir / "best.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    return None


def _check_new(cfg: TrainConfig, main: bool = True) -> None:
    cfg.validate()
    check_distillation(cfg)  # --adv ard and --teacher come together (the file is read once the data is known)
    validation_attacks(cfg.val_attack, 0.5)  # a bad val_attack fails now, not after the first epoch
    if main:
        check_new_run(cfg)  # before the work: a taken --name or an unwritable --out fails in a second


def prepare_launch(cfg: TrainConfig | None, resume: str | Path | None,
                   overrides: dict[str, Any] | None) -> tuple[TrainConfig | None, Path]:
    """Before workers start (`rcdeploy train --nproc N`): every check a worker would make, and the run
    folder they will write, named now (a derived name carries the time, which ranks could disagree on)."""
    if resume is None:
        assert cfg is not None, "fit needs a config or a run to resume"
        _check_new(cfg)
        cfg.name = run_name(cfg)
        return cfg, Path(cfg.out) / cfg.name
    run_dir, path = _resume_paths(resume)
    _resume_settings(path, overrides)
    return None, run_dir


def _resume_paths(resume: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint). A checkpoint other than the folder's last.pt (e.g. best.pt) is an earlier
    point of the run: continuing from it would silently drop the epochs after it, so it is refused."""
    path = Path(resume)
    path = path / "last.pt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path} (pass a run folder that holds last.pt)")
    if path.name != "last.pt" and (path.parent / "last.pt").exists():
        raise UsageError(f"--resume {path}: its run continues from {path.parent / 'last.pt'}; {path.name} is an "
                         "earlier point of it (export it, or copy it to a new folder to branch a run)")
    return path.parent, path


def _resume_settings(path: Path, overrides: dict[str, Any] | None,
                     ckpt: dict[str, Any] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's config with the allowed overrides, checked against how far the run got."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    cfg, changed = resume_config(ckpt["config"], overrides, f"checkpoint {path}: config")
    _check_resume_epochs(cfg, ckpt["position"], changed)
    return cfg, changed


def resumed_settings(resume: str | Path, overrides: dict[str, Any] | None) -> TrainConfig:
    """The settings a resumed run will continue with (checked; nothing is touched)."""
    return _resume_settings(_resume_paths(resume)[1], overrides)[0]


def _check_resume_epochs(cfg: TrainConfig, position: list[int], changed: dict[str, Any]) -> None:
    done, batch = position
    if cfg.epochs < done or (cfg.epochs == done and batch > 0):
        raise UsageError(f"--epochs {cfg.epochs} is below the {done + (batch > 0)} epoch(s) this run has already "
                         "started; pass a larger --epochs or omit it")
    if cfg.epochs == done:
        hint = "" if "epochs" in changed else f"; pass --epochs N (N > {done}) to train it further"
        raise UsageError(f"the run already finished its {done} epoch(s){hint}")


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl is the checkpoint's history, rewritten whole: a resumed run never repeats a line."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))


def _fit(cfg: TrainConfig, ckpt: dict[str, Any] | None, run_dir: Path | None, changed: dict[str, Any],
         stack: ExitStack, reporter: Reporter, stop_at: tuple[int, int] | None) -> RunResult:
    """The loop proper: a new run when `ckpt` is None (its folder made once the model is built), else a
    continuation of the locked `run_dir`."""
    device, world = _start_runtime(cfg)
    data = _training_data(cfg, device)
    teacher = load_teacher(cfg, data.meta, device)  # --adv ard: frozen; sets cfg.teacher_sha256 before it is saved
    settings, objective = adv_settings(cfg, data.meta.default_eps, teacher), OBJECTIVES[cfg.adv]
    batches = batches_per_epoch(len(data.train), cfg.batch_size, cfg.micro_batches)
    allocation = None if ckpt is None else ckpt.get("bit_allocation")
    if ckpt is None and cfg.bits == AUTO_BITS:  # pre-train, measure, choose per-layer bits (train/auto_bits.py)
        from rcdeploy.train.auto_bits import auto_bits_model

        # Every rank pre-trains the same seeded model (identical work, no collectives): simple and exact.
        spec, model, allocation = auto_bits_model(cfg, data, device, settings, objective, reporter)
    elif ckpt is None:
        spec, model = _new_model(cfg, data, device)  # identical on every rank: same seed, same calibration
    else:
        assert run_dir is not None
        spec, model = _resumed_model(ckpt, run_dir, device)
    forward = wrap(model, world, device, cfg.sync_bn)  # before the methods: SyncBatchNorm replaces modules
    model = unwrap(forward)
    sparsity, plugins = _methods(cfg, model, batches, ckpt)  # a bad name leaves no folder
    if not world.main:
        run_dir = run_dir or Path(cfg.out) / run_name(cfg)
    elif ckpt is None:
        run_dir = _new_run_folder(cfg, stack)
    else:
        assert run_dir is not None
        _reopen_run_folder(cfg, ckpt, run_dir, changed)
    run = _Run(cfg=cfg, device=device, data=data, settings=settings, objective=objective, spec=spec, model=model,
               sparsity=sparsity, plugins=plugins, optimizer=make_optimizer(cfg, model), run_dir=run_dir,
               batches=batches, pointed=ckpt is not None, bit_allocation=allocation, world=world, forward=forward)
    if ckpt is not None:
        run.restore(ckpt)
    result = run.run_epochs(changed, reporter, _StopFlag(stop_at))
    if allocation is not None and ckpt is None:
        from rcdeploy.train.auto_bits import summary_line

        result.notes.insert(0, summary_line(allocation))
    return result


# ------------------------------------------------------------------------------- the steps of _fit


def _start_runtime(cfg: TrainConfig) -> tuple[torch.device, World]:
    """The device, this process's place in a job (joined here), torch's thread count (in a job, the cores
    shared out over the ranks unless --threads says) and its global seed (model init and calibration)."""
    world = World.from_env(resolve_device(cfg.device))
    check_scale_out(cfg, world.size)
    device = local_device(resolve_device(cfg.device))
    threads = cfg.threads or (threads_per_rank() if world.distributed else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    return device, world


def _training_data(cfg: TrainConfig, device: torch.device) -> Dataset:
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, device=device,
                        val_fraction=cfg.val_fraction, seed=cfg.seed)
    return _train_subset(cfg, data)


def _new_model(cfg: TrainConfig, data: Dataset, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    """The model the settings describe, its activation ranges calibrated on seeded training batches."""
    spec = model_spec(cfg.model, quant_spec(cfg), **model_kwargs(cfg, data))
    model = build_model(spec, "settings").to(device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    calib = [x for x, _ in iterate_batches(data.train, cfg.batch_size, shuffle=True, generator=g)]
    calibrate_activations(model, (calib * ACT_CALIBRATION_STEPS)[:ACT_CALIBRATION_STEPS])
    return spec, model


def _new_run_folder(cfg: TrainConfig, stack: ExitStack) -> Path:
    """Create and lock the run folder (removed again if the run fails before its first checkpoint)."""
    run_dir = stack.enter_context(new_run(cfg))
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    _write_metrics(run_dir, [])
    return run_dir


def _resumed_model(ckpt: dict[str, Any], run_dir: Path, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    """The checkpoint's model with its weights."""
    spec = ckpt["model"]
    model = build_model(spec, f"checkpoint {run_dir / 'last.pt'}").to(device)
    load_weights(model, ckpt["state_dict"], run_dir / "last.pt")
    return spec, model


def _methods(cfg: TrainConfig, model: nn.Module, batches: int, ckpt: dict[str, Any] | None) -> tuple[Any, list[Any]]:
    """The run's sparsity method and plugins, their state restored from `ckpt` when resuming."""
    sparsity = _sparsity_for(cfg, model, batches)
    plugins = _plugins_for(cfg, model, sparsity)
    for p in plugins:
        state = ((ckpt or {}).get("plugins_state") or {}).get(p.name)
        if state is not None:
            p.load_state_dict(state)
    return sparsity, plugins


def _reopen_run_folder(cfg: TrainConfig, ckpt: dict[str, Any], run_dir: Path, changed: dict[str, Any]) -> None:
    _write_metrics(run_dir, list(ckpt.get("history", [])))  # drops lines written after last.pt was saved
    if changed:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    point_latest(run_dir)  # it has a checkpoint already


def _fresh_partial() -> dict[str, Any]:
    """The running sums of the epoch in progress (saved in last.pt when a run stops mid-epoch)."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}


@dataclass
class _Run:
    """One run while it trains: what its checkpoints hold, and the steps of an epoch."""

    cfg: TrainConfig
    device: torch.device
    data: Dataset
    settings: AdvSettings
    objective: Any
    spec: dict[str, Any]
    model: nn.Module
    sparsity: Any
    plugins: list[Any]
    optimizer: torch.optim.Optimizer
    run_dir: Path
    batches: int                # per epoch
    pointed: bool               # runs/latest points here (a resumed run's folder already has a checkpoint)
    position: tuple[int, int] = (0, 0)  # (epoch, batch) the run continues from
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    partial: dict[str, Any] = field(default_factory=_fresh_partial)
    bit_allocation: dict[str, Any] | None = None  # --bits auto: what auto_bits chose and measured
    world: World = field(default_factory=World)  # this rank's place in a DDP job (one process: rank 0 of 1)
    forward: nn.Module | None = None  # what the loss's forward goes through: DDP across ranks, else `model`
    bn: BatchNormAverager | None = None

    def __post_init__(self) -> None:
        self.forward = self.forward or self.model
        self.bn = BatchNormAverager(self.model, self.cfg.micro_batches or 1)

    @property
    def finetune_start(self) -> int:
        return finetune_epoch(self.cfg) if self.sparsity else 0

    @property
    def mask_at_end(self) -> bool:
        """No fine-tune epoch: the mask is fixed after the last epoch's training instead."""
        return self.sparsity is not None and self.finetune_start >= self.cfg.epochs

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Optimizer, sparsity state, position, history and the partial epoch from `ckpt`."""
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"checkpoint {self.run_dir / 'last.pt'}: optimizer state does not fit the model "
                             f"({type(e).__name__})") from None
        if self.sparsity is not None and ckpt.get("sparsity_state") is not None:
            self.sparsity.load_state_dict(ckpt["sparsity_state"])
        self.position = tuple(ckpt["position"])
        self.history, self.best = list(ckpt.get("history", [])), ckpt.get("best")
        self.partial = dict(ckpt.get("partial_epoch") or self.partial)

    def run_epochs(self, changed: dict[str, Any], reporter: Reporter, stop: _StopFlag) -> RunResult:
        """Every remaining epoch: train, validate, checkpoint; on a stop, last.pt at the exact batch."""
        cfg = self.cfg
        result = RunResult(run_dir=self.run_dir, metrics=self.history, best=self.best, changed=changed)
        if self.mask_at_end:
            result.notes.append(f"{cfg.epochs} epoch(s) leave no fine-tune epoch (finetune_fraction "
                                f"{cfg.finetune_fraction:g}): the channel mask was fixed after the last epoch's "
                                "training")
        start_epoch, start_batch = self.position
        with stop.installed():
            for epoch in range(start_epoch, cfg.epochs):
                train_time = self.train_epoch(epoch, start_batch if epoch == start_epoch else 0, reporter, stop)
                if train_time is None:
                    result.interrupted = True
                    return result
                metrics = self.validate(epoch, train_time)
                if self.checkpoint(epoch, metrics):
                    result.best = self.best
                reporter.end_epoch(metrics)
        result.best = self.best
        return result

    def train_epoch(self, epoch: int, start_batch: int, reporter: Reporter, stop: _StopFlag) -> float | None:
        """One epoch's batches from `start_batch`: its training seconds, or None if stopped (last.pt saved)."""
        cfg, model, sparsity = self.cfg, self.model, self.sparsity
        if sparsity is not None and epoch == self.finetune_start and start_batch == 0:
            sparsity.start_finetune(model)
        for p in self.plugins:
            p.start_epoch(model, epoch)
        lr_factor = math.prod(p.lr_factor(epoch) for p in self.plugins)
        model.train()
        perm_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        order = torch.randperm(len(self.data.train), generator=perm_gen).to(self.device)
        reporter.start_epoch(epoch, cfg.epochs, self.batches, start_batch)
        t0 = time.perf_counter()
        for b in range(start_batch, self.batches):
            if self.world.any(stop.due(epoch, b)):  # every rank stops at the same batch
                self.partial["time"] += time.perf_counter() - t0
                self.save("last.pt", epoch, b, self.partial)
                return None
            self.train_step(epoch, b, order, lr_factor, reporter)
        if sparsity is not None:
            sparsity.end_epoch(model, epoch, cfg.epochs)
            if self.mask_at_end and epoch == cfg.epochs - 1:
                sparsity.start_finetune(model)
        for p in self.plugins:
            if hasattr(p, "end_epoch") and p.end_epoch(model, epoch):
                # The plugin replaced layers (low rank's swap): the spec must rebuild them, and the optimizer
                # must hold the new parameters (it restarts without momentum).
                self.spec = {**self.spec, "kwargs": {**self.spec["kwargs"], **p.spec_kwargs()}}
                if sparsity is not None:
                    sparsity.retrace(model)  # new layers, new channel groups; pruned channels stay pruned
                self.forward = wrap(model, self.world, self.device, sync_bn=False)  # DDP over the new parameters
                self.bn = BatchNormAverager(model, cfg.micro_batches or 1)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer = make_optimizer(cfg, model)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
        return self.partial["time"] + time.perf_counter() - t0

    def train_step(self, epoch: int, b: int, order: torch.Tensor, lr_factor: float, reporter: Reporter) -> None:
        """Batch `b` of `epoch`: this rank's micro-batches (scaleout.py), their gradients summed over all
        micro-batches of every rank, one optimizer step."""
        cfg, model, sparsity, optimizer = self.cfg, self.model, self.sparsity, self.optimizer
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        parts = micro_slices(len(idx), cfg.micro_batches or 1)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch + b / self.batches, self.batches) * lr_factor
        optimizer.zero_grad(set_to_none=True)
        self.bn.begin_step()
        sums = torch.zeros(3, dtype=torch.float64)  # loss x images, correct, images
        own = mine(self.world, len(parts))
        for j in own:
            # Scaled by N so that DDP's mean over ranks is the sum over micro-batches (exactly: N is a power of
            # two in the equality tests, and any N only rescales).
            weight = (parts[j].stop - parts[j].start) / len(idx)
            with no_sync(self.forward, last=j == own[-1]):
                sums += self.micro_step(epoch, b, j, idx[parts[j]], weight)
        self.world.sum_(sums)
        self.bn.end_step(self.world)
        optimizer.step()
        if sparsity is not None:
            sparsity.after_step(model, optimizer.param_groups[0]["lr"])
        loss_value = float(sums[0] / sums[2])
        self.partial["loss"] += float(sums[0])
        self.partial["correct"] += int(sums[1])
        self.partial["seen"] += int(sums[2])
        reporter.batch(loss_value, int(sums[2]))

    def micro_step(self, epoch: int, b: int, j: int, idx: torch.Tensor, weight: float) -> torch.Tensor:
        """Micro-batch `j`: replayable augmentation, attack and model noise, the objective plus any penalty,
        backward of its share `weight` of the step's loss. Returns [loss x images, correct, images]."""
        model, train = self.model, self.data.train
        gen = batch_generator(self.cfg.seed, epoch, b, self.device, micro=j)
        torch.manual_seed(micro_key(self.cfg.seed, epoch, b, j))  # a stochastic model's noise (EnResNet)
        x = augment(train.x[idx], self.data.meta, gen)
        y = train.y[idx]
        self.bn.begin_micro()
        loss, logits = self.objective(self.forward, x, y, self.settings, gen)
        if self.sparsity is not None:
            extra = self.sparsity.penalty(model)
            if extra is not None:
                loss = loss + extra
        for p in self.plugins:
            extra = p.penalty(model) if hasattr(p, "penalty") else None
            if extra is not None:
                loss = loss + extra
        (loss * (weight * self.world.size)).backward()
        self.bn.end_micro(weight)
        loss_value = float(loss.detach())
        return torch.tensor([loss_value * len(y), float((logits.argmax(1) == y).sum()), float(len(y))],
                            dtype=torch.float64)

    def validate(self, epoch: int, train_time: float) -> dict[str, Any]:
        """Clean and robust accuracy on the validation images: the epoch's metrics line, appended to history."""
        cfg, sparsity, partial = self.cfg, self.sparsity, self.partial
        val_n = len(self.data.val) if cfg.val_samples is None else min(cfg.val_samples, len(self.data.val))
        ev = evaluate(self.model, self.data.val.x[:val_n], self.data.val.y[:val_n], cfg.val_attack,
                      self.settings.eps, seed=cfg.seed, eot=cfg.eot, world=self.world)
        metrics = {
            "epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": partial["loss"] / max(1, partial["seen"]),
            "train_acc": 100.0 * partial["correct"] / max(1, partial["seen"]),
            "val_clean_acc": ev["clean_acc"], "val_robust_acc": ev["robust_acc"], "val_attack": cfg.val_attack,
            "eps": self.settings.eps, "img_per_s": partial["seen"] / max(train_time, 1e-9),
            "train_time_s": train_time,
            "phase": "finetune" if sparsity is not None and epoch >= self.finetune_start else (
                "sparsify" if sparsity is not None else "train"),
        }
        if sparsity is not None:
            metrics["sparsity"] = sparsity.stats(self.model)
        # Every run, whatever its method: channel and weight sparsity as the seed-002 code counts them.
        metrics["paper_sparsity"] = sparsity_report(self.model)
        for p in self.plugins:
            metrics[p.name] = p.stats()
        self.history.append(metrics)
        self.partial = _fresh_partial()
        return metrics

    def checkpoint(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """best.pt if this epoch is the best eligible one so far (returns whether), then last.pt, then
        metrics.jsonl (after last.pt: the file never runs ahead of the checkpoint)."""
        # With sparsity on, only mask-fixed (fine-tune phase) epochs may become best.pt: an earlier,
        # denser model would make `export --prune-channels` remove nothing.
        fixed = (self.sparsity is None or epoch >= self.finetune_start
                 or (self.mask_at_end and epoch == self.cfg.epochs - 1))
        eligible = fixed and all(p.eligible(epoch) for p in self.plugins)
        key = (metrics["val_robust_acc"], metrics["val_clean_acc"])
        improved = eligible and (self.best is None or key > (self.best["val_robust_acc"], self.best["val_clean_acc"]))
        if improved:
            self.best = dict(metrics)
            self.save("best.pt", epoch + 1, 0, None)
        self.save("last.pt", epoch + 1, 0, None)
        if self.world.main:
            _write_metrics(self.run_dir, self.history)
        return improved

    def save(self, name: str, epoch: int, batch: int, part: dict[str, Any] | None) -> None:
        """Write a checkpoint (rank 0 only: every rank holds the same state)."""
        if not self.world.main:
            return
        sparsity, history = self.sparsity, self.history
        atomic_save({
            "format": FORMAT, "version": VERSION, "rcdeploy": rcdeploy.__version__,
            "model": self.spec, "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sparsity_state": sparsity.state_dict() if sparsity else None,
            "sparsity": sparsity.stats(self.model) if sparsity else None,
            "plugins_state": {p.name: p.state_dict() for p in self.plugins},
            "config": self.cfg.to_dict(), "dataset": self.data.meta.to_dict(), "position": [epoch, batch],
            "partial_epoch": part, "history": history, "best": self.best,
            "metrics": history[-1] if history else {}, "eps": self.settings.eps,
            "bit_allocation": self.bit_allocation,
        }, self.run_dir / name)
        if not self.pointed:  # runs/latest moves here only now that the run has a checkpoint
            point_latest(self.run_dir)
            self.pointed = True
