"""Training recipes: one dataclass, YAML files, CLI overrides (defaults < recipe < command line)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from rcdeploy.errors import UsageError

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
    model_args: dict[str, Any] = field(default_factory=dict)  # extra model settings, e.g. {noise: 0.1} (EnResNet)
    quant_method: str = "qat"            # qat | binary-relax (relaxed weights, then exact Q(w); see quant/binary_relax)
    br_lambda: float = 1.0               # binary-relax: initial lambda in w_r = (w + lambda Q(w)) / (1 + lambda)
    br_growth: float = 1.05              # binary-relax: lambda *= growth after every epoch
    br_exact_fraction: float = 0.2       # binary-relax: last share of epochs on exact Q(w) (at least one epoch)
    br_exact_lr: float = 0.1             # binary-relax: learning-rate factor in the exact phase
    # adversarial objective
    adv: str = "pgd"                     # none | fgsm-rs | pgd | trades
    eps: float | str | None = None       # L-inf, image units in [0, 1]; None: the dataset's literature default
    steps: int = 5                       # attack steps for pgd / trades during training
    step_size: float | str | None = None  # None: 2.5 * eps / steps (Madry et al.)
    beta: float = 6.0                    # TRADES trade-off
    # optimisation
    epochs: int = 15
    batch_size: int = 128
    train_samples: int | None = None     # cap on training images (a seeded subset), for short runs
    optimizer: str = "sgd"               # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"             # cosine | piecewise | constant
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
    sparsity: str = "group-lasso"        # group-lasso | rgsm | slimming (channels); rvsm | admm (weights)
    prune_weights: float = 0.0           # rvsm | admm: target share of weights zeroed (admm needs it; rvsm reports it)
    sparsity_params: dict[str, Any] = field(default_factory=dict)
    channel_multiple: int = 1
    finetune_fraction: float = 0.3       # last share of epochs: mask fixed, the rest fine-tuned
    # runtime
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    threads: int | None = None           # torch CPU threads (None: torch's default); tiny inputs run best on 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> TrainConfig:
        """Parse fractions, check ranges; returns self. Bad values raise UsageError."""
        self.eps = parse_fraction(self.eps, "eps") if self.eps is not None else None
        if self.eps is not None and not 0 < self.eps <= 1:
            raise UsageError(f"--eps {self.eps} is outside (0, 1]: eps is in image units, e.g. 8/255")
        self.step_size = parse_fraction(self.step_size, "step-size") if self.step_size is not None else None
        if self.step_size is not None and self.step_size <= 0:
            raise UsageError("--step-size must be > 0")
        for name in ("epochs", "batch_size", "steps"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise UsageError("--lr must be > 0")
        if not 0 <= self.prune_channels < 1:
            raise UsageError(f"--prune-channels {self.prune_channels} must be in [0, 1)")
        if not 0 <= self.prune_weights < 1:
            raise UsageError(f"--prune-weights {self.prune_weights} must be in [0, 1)")
        if int(self.eot) < 1:
            raise UsageError("--eot must be >= 1")
        if self.train_samples is not None and int(self.train_samples) < 1:
            raise UsageError("--train-samples must be >= 1")
        if self.quant_method not in QUANT_METHODS:
            raise UsageError(f"unknown quantization method {self.quant_method!r}; known: {', '.join(QUANT_METHODS)}")
        if not isinstance(self.model_args, dict):
            raise UsageError("model_args must be a mapping of model settings, e.g. {noise: 0.1}")
        if self.adv not in ADVERSARIES:
            raise UsageError(f"unknown adversary {self.adv!r}; known: {', '.join(ADVERSARIES)}")
        if self.schedule not in ("cosine", "piecewise", "constant"):
            raise UsageError(f"unknown schedule {self.schedule!r}; known: cosine, piecewise, constant")
        if self.optimizer not in ("sgd", "adam"):
            raise UsageError(f"unknown optimizer {self.optimizer!r}; known: sgd, adam")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UsageError(f"--device {self.device!r}: use auto, cpu or cuda")
        return self


ADVERSARIES = ("none", "fgsm-rs", "pgd", "trades")
QUANT_METHODS = ("qat", "binary-relax")
MERGED_SETTINGS = ("sparsity_params", "model_args")  # mappings that overrides extend rather than replace


def parse_fraction(value: float | int | str, what: str = "value") -> float:
    """'8/255' -> 0.0313..., '0.1' -> 0.1; anything else is a UsageError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--{what} {value!r} is not a number or fraction like 8/255") from None


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe by file path, or by name from the bundled recipes folder."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = RECIPES_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    raise UsageError(f"recipe {str(name_or_path)!r} not found (no such file; bundled recipes: {known})")


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe is a mapping of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def default_recipe(overrides: dict[str, Any]) -> str | None:
    """The base recipe when none is named: the quick-start while the task is the quick-start's (digits,
    its model); naming another dataset or model starts from the generic defaults, so digits-tuned
    settings (epochs, pruning) never leak into, say, a CIFAR run."""
    quick = overrides.get("dataset") in (None, "digits") and overrides.get("model") in (None, "small_cnn")
    return "quickstart" if quick else None


def make_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < recipe < overrides (None values in overrides are ignored)."""
    values: dict[str, Any] = load_recipe(recipe) if recipe is not None else {}
    for key, v in (overrides or {}).items():
        if v is None:
            continue
        if key in MERGED_SETTINGS and isinstance(v, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **v}  # e.g. --sparsity-param lambda1=0.05 keeps the recipe's beta
        else:
            values[key] = v
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values).validate()


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return dataclasses.replace(TrainConfig(), **{k: v for k, v in d.items() if k in known})


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
