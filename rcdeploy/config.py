"""Training recipes: one dataclass, YAML files, CLI overrides (defaults < recipe < command line)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rcdeploy import validate as V
from rcdeploy.errors import UsageError
from rcdeploy.names import OBJECTIVES, OPTIMIZERS, QUANT_METHODS, SCHEDULES, SPARSITY, WEIGHTS
from rcdeploy.units import parse_fraction, parse_size

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved whole in every checkpoint and in config.yaml."""

    name: str | None = None              # run folder name under `out`; default derived from the settings
    out: str = "runs"                    # folder holding run folders (and the `latest` link)
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_fraction: float = 0.1            # seeded hold-out from the training split, picks checkpoints
    # model and quantization
    model: str = "small_cnn"
    width: float | None = None           # channel width multiplier (model default when None)
    bits: int | str = 4                  # weight bits: float, 8, 7, 6, 5, 4, 3, 2 (ternary), 1 (binary)
    act_bits: int | str = 8
    first_last_bits: int | str | None = 8  # 7: every exported layer runs u8 x s8 kernels (see README, Export)
    bit_overrides: dict[str, int | str] = field(default_factory=dict)  # fnmatch layer pattern -> bits
    size_budget: int | str | None = None  # bits auto: byte budget of the weight layers, e.g. 20KB (quant/allocate)
    auto_bits_epochs: int = 2            # bits auto: adversarial epochs at 8 bits before the layers are measured
    auto_bits_amplification: str = "bound"  # bits auto: weigh errors by the Lipschitz bound, or by the measured gain
    model_args: dict[str, Any] = field(default_factory=dict)  # extra model settings, e.g. {noise: 0.1} (EnResNet)
    quant_method: str = "qat"            # rcdeploy.names.QUANT_METHODS: qat | binary-relax (see quant/binary_relax)
    br_lambda: float = 1.0               # binary-relax: initial lambda in w_r = (w + lambda Q(w)) / (1 + lambda)
    br_growth: float = 1.05              # binary-relax: lambda *= growth after every epoch
    br_exact_fraction: float = 0.2       # binary-relax: last share of epochs on exact Q(w) (at least one epoch)
    br_exact_lr: float = 0.1             # binary-relax: learning-rate factor in the exact phase
    # adversarial objective
    adv: str = "pgd"                     # rcdeploy.names.OBJECTIVES: none | fgsm-rs | pgd | trades | mixed | ard
    eps: float | str | None = None       # L-inf, image units in [0, 1]; None: the dataset's literature default
    steps: int = 5                       # attack steps for pgd / trades during training
    step_size: float | str | None = None  # None: 2.5 * eps / steps (Madry et al.)
    beta: float = 6.0                    # TRADES trade-off
    alpha: float = 0.5                   # mixed: (1 - alpha) CE(clean) + alpha CE(adversarial); ard: weight of
                                         # the distillation term (the ARD reference code's default is 1)
    teacher: str | None = None           # ard: the teacher's checkpoint (file or run folder; stored resolved)
    teacher_sha256: str | None = None    # ard: the teacher file's hash, set when the run starts, checked on resume
    distill_temperature: float = 30.0    # ard: temperature T of the distillation KL (the ARD reference code's)
    # optimisation
    epochs: int = 15
    batch_size: int = 128
    train_samples: int | None = None     # cap on training images (a seeded subset), for short runs
    optimizer: str = "sgd"               # rcdeploy.names.OPTIMIZERS: sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"             # rcdeploy.names.SCHEDULES: cosine | piecewise | constant | onecycle
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # piecewise: fractions of training
    gamma: float = 0.1                   # piecewise lr factor per milestone
    warmup_epochs: float = 0.0
    # evaluation (validation split, every epoch)
    val_attack: str = "pgd20"
    val_samples: int | None = 1000       # cap on validation images per epoch (None: all)
    eot: int = 1                         # noise draws per evaluation, for stochastic models (EnResNet): attack
                                         # gradients are averaged over them, accuracy is the mean over them
    # structured channel sparsity
    prune_channels: float = 0.0          # target share of prunable channels removed (0 = off)
    sparsity: str = "group-lasso"        # rcdeploy.names.SPARSITY: group-lasso | rgsm | slimming (channels);
                                         # rvsm | admm (weights)
    prune_weights: float = 0.0           # rvsm | admm | atmc: target share of weights zeroed (rvsm only reports it)
    codebook_bits: int | None = None     # atmc: at most 2**b nonzero values per weight tensor (None: atmc's 4)
    sparsity_params: dict[str, Any] = field(default_factory=dict)
    channel_multiple: int = 1
    finetune_fraction: float = 0.3       # last share of epochs: mask fixed, the rest fine-tuned
    # CSTAR low rank (rcdeploy.train.lowrank): Tucker-2 layers to a parameter budget
    low_rank: float | str | None = None  # compression of the factorized layers' parameters, e.g. 8x (None: off)
    rank_rho: float = 1e-2               # ADMM penalty rho/2 ||W - Z + U||^2
    rank_admm_at: float = 0.3            # share of epochs trained dense before ranks are chosen and ADMM starts
    rank_swap_at: float = 0.7            # share of epochs after which layers are swapped to factors (then fine-tuned)
    # runtime
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    threads: int | None = None           # torch CPU threads (None: torch's default; per rank: cores / ranks)
    # scale out (rcdeploy.train.distributed): a step is `micro_batches` slices of the batch, shared by the ranks
    nproc: int = 1                       # local worker processes (DDP); may change on --resume if it divides
                                         # micro_batches
    micro_batches: int | None = None     # slices of each batch (None: nproc); fixed for the run
    sync_bn: bool = False                # SyncBatchNorm across ranks (CUDA only)
    max_restarts: int = 0                # --nproc: restart the workers this often after a failure (they resume
                                         # the run from last.pt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, source: str = "settings") -> TrainConfig:
        """Check every field's type and range (`FIELD_CHECKS`), then parse fractions and names; returns self.

        Bad values raise one UsageError line naming `source` and the field.
        """
        check_settings(self.to_dict(), source)
        self.eps = parse_fraction(self.eps, "eps") if self.eps is not None else None
        if self.eps is not None and not 0 < self.eps <= 1:
            raise UsageError(f"--eps {self.eps} is outside (0, 1]: eps is in image units, e.g. 8/255")
        self.step_size = parse_fraction(self.step_size, "step-size") if self.step_size is not None else None
        if self.step_size is not None and not 0 < self.step_size <= 1:
            raise UsageError(f"--step-size {self.step_size:g} is outside (0, 1]: it is in image units, e.g. 2/255")
        for registry, name in ((QUANT_METHODS, self.quant_method), (OBJECTIVES, self.adv), (SCHEDULES, self.schedule),
                               (OPTIMIZERS, self.optimizer)):
            registry.check(name)  # "unknown adversary 'x'; known: none, fgsm-rs, pgd, trades"; imports nothing
        check_auto_bits(self)
        if self.low_rank is not None:
            self.low_rank = parse_ratio(self.low_rank)
            _check_low_rank(self)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UsageError(f"--device {self.device!r}: use auto, cpu or cuda")
        check_scale_out(self)
        if self.name is not None and (self.name in (".", "..", "latest") or "/" in self.name or "\\" in self.name
                                      or self.name.startswith(".")):
            raise UsageError(f"--name {self.name!r}: a run name is one folder name (no '/', not starting with "
                             "'.', not 'latest')")
        return self


DISTILL_OBJECTIVE = "ard"  # the objective that takes --teacher


def check_distillation(cfg: TrainConfig) -> None:
    """--adv ard and --teacher come together; a pinned teacher hash is a sha256 (the file is read at fit time)."""
    if cfg.adv == DISTILL_OBJECTIVE and not cfg.teacher:
        raise UsageError("--adv ard distills a teacher: pass --teacher PATH (an rcdeploy checkpoint such as "
                         "runs/dense/best.pt, or its run folder)")
    if cfg.teacher is not None and cfg.adv != DISTILL_OBJECTIVE:
        raise UsageError(f"--teacher is the teacher of --adv ard; --adv {cfg.adv} takes none (pass --adv ard, or "
                         "drop --teacher)")
    if cfg.teacher_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", cfg.teacher_sha256):
        raise UsageError(f"teacher_sha256 {cfg.teacher_sha256!r}: expected 64 lowercase hex digits (a sha256)")


def parse_ratio(value: Any) -> float:
    """'8x', '8', 8 -> 8.0: a compression ratio, a finite number above 1."""
    text = str(value).strip().lower()
    try:
        ratio = float(text[:-1] if text.endswith("x") else text)
    except ValueError:
        raise UsageError(f"--low-rank {value!r}: write a compression ratio such as 8x") from None
    if not math.isfinite(ratio) or ratio <= 1:
        raise UsageError(f"--low-rank {value!r}: the ratio must be above 1 (e.g. 2x .. 64x)")
    return ratio


def check_scale_out(cfg: TrainConfig, world_size: int | None = None) -> None:
    """--nproc / --micro-batches / --sync-bn: a batch splits into micro-batches, each rank takes an equal share.

    `world_size` is the job's size when already inside one (torchrun); else --nproc is.
    """
    ranks = world_size or _job_size() or cfg.nproc
    cfg.nproc = ranks  # what the run last ran on (informational; a run may move between rank counts)
    if cfg.micro_batches is None:
        cfg.micro_batches = ranks
    if ranks > cfg.micro_batches:
        raise UsageError(f"--nproc {ranks} is above the run's {cfg.micro_batches} micro-batch(es): each rank needs "
                         "at least one (a new run: pass --micro-batches as a multiple of --nproc)")
    if cfg.micro_batches % ranks:
        raise UsageError(f"--nproc {ranks} does not divide the run's {cfg.micro_batches} micro-batches: every rank "
                         "must take the same number")
    if cfg.micro_batches > cfg.batch_size:
        raise UsageError(f"--micro-batches {cfg.micro_batches} is above --batch-size {cfg.batch_size}: a "
                         "micro-batch needs at least one image")
    if cfg.sync_bn and not str(cfg.device).startswith("cuda"):
        raise UsageError("--sync-bn needs --device cuda: SyncBatchNorm has no CPU path in PyTorch (on CPU, "
                         "BatchNorm statistics are per micro-batch and the running averages are averaged each step)")


def _job_size() -> int | None:
    """Inside a torchrun job (RANK and WORLD_SIZE set) its size: that is how many ranks train."""
    size = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    return size if size > 1 else None


def _check_low_rank(cfg: TrainConfig) -> None:
    """What low rank does not compose with yet: refused, never silently wrong."""
    if cfg.prune_weights or (cfg.sparsity and SPARSITY.declaration(cfg.sparsity).kind == WEIGHTS):
        raise UsageError("--low-rank with weight sparsity is not supported (a sparse kernel has no low-rank "
                         "factors that keep its zeros); channel sparsity (--prune-channels) composes with it")
    if cfg.prune_channels and cfg.finetune_fraction != TrainConfig.finetune_fraction:
        raise UsageError("--low-rank with --prune-channels fixes the channel mask when the ADMM phase starts "
                         "(rank_admm_at); finetune_fraction does not apply: leave it unset")
    if cfg.quant_method != "qat":
        raise UsageError(f"--low-rank with --quant {cfg.quant_method} is not supported yet (the relaxation hooks "
                         "name the dense layers that the swap replaces); use --quant qat")
    if not 0 <= cfg.rank_admm_at <= cfg.rank_swap_at <= 1:
        raise UsageError(f"rank_admm_at {cfg.rank_admm_at} and rank_swap_at {cfg.rank_swap_at}: need "
                         "0 <= rank_admm_at <= rank_swap_at <= 1")


MERGED_SETTINGS = ("sparsity_params", "model_args")  # mappings that overrides extend rather than replace
RESUME_SETTINGS = ("epochs", "device", "threads", "nproc", "max_restarts")  # what `--resume` may change; anything else would make
                                                   # the continued run a different run
MAX_RECIPE_BYTES = 1 << 20

# Ranges of the numeric fields (types come from the annotations); the bounds are generous sanity limits.
_fraction_or_number = V.one_of(V.number(), V.text(max_len=64), expected="a number or a fraction like 8/255")
FIELD_RANGES: dict[str, V.Check] = {
    "name": V.optional(V.text(max_len=200)),
    "val_fraction": V.number(0, 1, hi_open=True),
    "width": V.optional(V.number(0, 64, lo_open=True)),
    "bits": V.one_of(V.integer(1, 32), V.text(max_len=16), expected="bits: an integer or float"),
    "act_bits": V.one_of(V.integer(1, 32), V.text(max_len=16), expected="bits: an integer or float"),
    "first_last_bits": V.optional(V.one_of(V.integer(1, 32), V.text(max_len=16), expected="bits: an integer or float")),
    "bit_overrides": V.mapping(values=V.one_of(V.integer(1, 32), V.text(max_len=16), expected="bits"), max_len=1000),
    "size_budget": V.optional(V.one_of(V.integer(1), V.text(max_len=64), expected="a size like 20KB")),
    "auto_bits_epochs": V.integer(0, 100_000),
    "br_lambda": V.number(0, 1e6),
    "br_growth": V.number(0, 1e3, lo_open=True),
    "br_exact_fraction": V.number(0, 1),
    "br_exact_lr": V.number(0, 1e3, lo_open=True),
    "eps": V.optional(_fraction_or_number),
    "steps": V.integer(1, 10_000),
    "step_size": V.optional(_fraction_or_number),
    "beta": V.number(0, 1e6),
    "alpha": V.number(0, 1),
    "teacher": V.optional(V.text(max_len=4096)),
    "teacher_sha256": V.optional(V.text(max_len=64)),
    "distill_temperature": V.number(0, 1e4, lo_open=True),
    "epochs": V.integer(1, 100_000),
    "batch_size": V.integer(1, 1 << 20),
    "train_samples": V.optional(V.integer(1)),
    "lr": V.number(0, 1e3, lo_open=True),
    "momentum": V.number(0, 1, hi_open=True),
    "weight_decay": V.number(0, 1),
    "milestones": V.list_of(V.number(0, 1), max_len=100),
    "gamma": V.number(0, 1e3, lo_open=True),
    "warmup_epochs": V.number(0, 100_000),
    "val_samples": V.optional(V.integer(1)),
    "eot": V.integer(1, 10_000),
    "prune_channels": V.number(0, 1, hi_open=True),
    "prune_weights": V.number(0, 1, hi_open=True),
    "codebook_bits": V.optional(V.integer(1, 8)),
    "channel_multiple": V.integer(1, 4096),
    "finetune_fraction": V.number(0, 1),
    "low_rank": V.optional(V.one_of(V.number(1, 1e6, lo_open=True), V.text(max_len=32),
                                    expected="a compression ratio such as 8x")),
    "rank_rho": V.number(0, 1e6),
    "rank_admm_at": V.number(0, 1),
    "rank_swap_at": V.number(0, 1),
    "seed": V.integer(0, 2**32 - 1),
    "threads": V.optional(V.integer(1, 4096)),
    "nproc": V.integer(1, 4096),
    "max_restarts": V.integer(0, 1000),
    "micro_batches": V.optional(V.integer(1, 1 << 20)),
}


AUTO_BITS = "auto"  # --bits auto: per-layer bits chosen under --size-budget (rcdeploy.train.auto_bits)
AMPLIFICATIONS = ("bound", "measured")  # what weighs a layer's error (rcdeploy.train.auto_bits)


def check_auto_bits(cfg: TrainConfig) -> None:
    """`--bits auto` and `--size-budget` come together; the budget must parse as a size."""
    auto = str(cfg.bits).strip().lower() == AUTO_BITS
    if not auto:
        if cfg.size_budget is not None:
            raise UsageError(f"--size-budget needs --bits auto (it is the budget per-layer bits are chosen under; "
                             f"got --bits {cfg.bits})")
        return
    cfg.bits = AUTO_BITS
    if cfg.size_budget is None:
        raise UsageError("--bits auto needs --size-budget, the byte budget of the weight layers, e.g. 20KB")
    parse_size(cfg.size_budget, "size-budget")
    if cfg.auto_bits_amplification not in AMPLIFICATIONS:
        raise UsageError(f"--auto-bits-amplification {cfg.auto_bits_amplification!r}: use "
                         f"{' or '.join(AMPLIFICATIONS)}")
    if cfg.quant_method != "qat":
        raise UsageError(f"--bits auto trains with --quant qat, not {cfg.quant_method}")
    if getattr(cfg, "low_rank", None) is not None:  # the swap to factors renames the layers bits were chosen for
        raise UsageError("--bits auto with --low-rank is not supported yet; choose uniform --bits")


def _field_checks() -> dict[str, V.Check]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: FIELD_RANGES.get(f.name) or V.check_for_type(hints[f.name]) for f in fields(TrainConfig)}


FIELD_CHECKS = _field_checks()


def check_settings(values: dict[str, Any], source: str, *, flags: bool = False) -> dict[str, Any]:
    """Unknown names and wrong types or ranges are one UsageError naming `source` and the field
    (as `--flag` when the values came from the command line)."""
    unknown = sorted(set(values) - set(FIELD_CHECKS))
    if unknown:
        raise UsageError(f"{source}: unknown setting(s) {', '.join(map(str, unknown))}; known: "
                         f"{', '.join(sorted(FIELD_CHECKS))}")
    for key, value in values.items():
        where = f"--{key.replace('_', '-')}" if flags else key
        try:
            FIELD_CHECKS[key](value, where)
        except V.Invalid as e:
            raise UsageError(f"{source}: {e}" if not flags else str(e)) from None
    return values


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe by file path, or by name from the bundled recipes folder."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.is_dir():
        raise UsageError(f"recipe {str(p)!r} is a folder; pass a YAML file or a bundled recipe name")
    bundled = RECIPES_DIR / f"{name_or_path}.yaml"
    if "/" not in str(name_or_path) and bundled.is_file():
        return bundled
    known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    raise UsageError(f"recipe {str(name_or_path)!r} not found (no such file; bundled recipes: {known})")


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe's settings, checked field by field (types, ranges, size) before anything uses them."""
    path = recipe_path(name_or_path)
    source = f"recipe {path}"
    data = V.safe_yaml(V.read_text_file(path, "recipe", MAX_RECIPE_BYTES), source) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a recipe is a mapping of settings (key: value), got {V.shown(data)}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    return check_settings(values, source)


def default_recipe(overrides: dict[str, Any]) -> str | None:
    """The base recipe when none is named: the quick-start while the task is the quick-start's (digits,
    its model); naming another dataset or model starts from the generic defaults, so digits-tuned
    settings (epochs, pruning) never leak into, say, a CIFAR run."""
    quick = overrides.get("dataset") in (None, "digits") and overrides.get("model") in (None, "small_cnn")
    return "quickstart" if quick else None


def given(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The overrides the user actually gave (None means 'not given')."""
    return {k: v for k, v in (overrides or {}).items() if v is not None}


def make_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < recipe < overrides (None values in overrides are ignored)."""
    values: dict[str, Any] = load_recipe(recipe) if recipe is not None else {}
    flags = check_settings(given(overrides), "command line", flags=True)
    for key, v in flags.items():
        if key in MERGED_SETTINGS and isinstance(v, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **v}  # e.g. --sparsity-param lambda1=0.05 keeps the recipe's beta
        else:
            values[key] = v
    return TrainConfig(**values).validate()


def resume_config(saved: dict[str, Any], overrides: dict[str, Any] | None, source: str) -> tuple[TrainConfig, dict]:
    """The run's own settings (a checkpoint's config), with only the RESUME_SETTINGS the user gave applied.

    Returns the config and {setting: (run's value, new value)} for every override that changed something,
    so the caller can say so. Any other setting given with --resume is refused: it would change the run.
    """
    flags = check_settings(given(overrides), "command line", flags=True)
    refused = sorted(k for k in flags if k not in RESUME_SETTINGS)
    if refused:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in refused)
        raise UsageError(f"{names} cannot change a run on --resume (it continues with its own settings; only "
                         f"{', '.join('--' + k for k in RESUME_SETTINGS)} may change); start a new run instead")
    cfg = config_from_dict(saved, source)
    changed = {k: (getattr(cfg, k), v) for k, v in flags.items() if getattr(cfg, k) != v}
    for k, (_, v) in changed.items():
        setattr(cfg, k, v)
    return cfg.validate(source), changed


def config_from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from a saved dict (checkpoint, config.yaml); fields of newer versions are dropped."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in V.validate(d, V.mapping(), source).items() if k in known}
    check_settings(values, source)
    return dataclasses.replace(TrainConfig(), **values)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
