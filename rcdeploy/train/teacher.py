"""The frozen teacher of `--adv ard` (adversarially robust distillation, rcdeploy.train.objectives.ard): found,
checked against the dataset, hashed, loaded once per process; never trained, never saved with the student."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.io import file_sha256
from rcdeploy.train.checkpoint import load_model

if TYPE_CHECKING:
    from rcdeploy.config import TrainConfig
    from rcdeploy.data import DatasetMeta


def teacher_file(given: str | Path) -> Path:
    """--teacher: a checkpoint file, or a run folder (its best.pt); the absolute path, links resolved (so
    `runs/latest`, which the student's own run takes over, still names the teacher on resume)."""
    path = Path(given).expanduser()
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise UsageError(f"--teacher {given}: the folder holds no best.pt (pass a checkpoint file, e.g. "
                             f"{path / 'last.pt'})")
        path = path / "best.pt"
    return path.resolve()


def _teacher_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise UsageError(f"--teacher {path}: cannot be read ({e.strerror or type(e).__name__})") from None


def load_teacher(cfg: TrainConfig, meta: DatasetMeta, device: torch.device) -> nn.Module | None:
    """The frozen teacher of `--adv ard` (None without --teacher), loaded once per process with the checkpoint
    loader: eval mode, no gradients, on `device`; it is never trained and never saved with the student.

    Sets `cfg.teacher` to the resolved file and `cfg.teacher_sha256` to its hash, which the run's config
    keeps; a hash already there (a resumed run, or pinned in a recipe) must match the file."""
    if cfg.teacher is None:
        return None
    path = teacher_file(cfg.teacher)
    try:
        model, raw = load_model(path, map_location=device)
    except UsageError as e:
        raise UsageError(f"--teacher: {e}") from None
    _check_teacher_data(path, raw["dataset"], meta)
    digest = _teacher_sha256(path)
    if cfg.teacher_sha256 is not None and cfg.teacher_sha256 != digest:
        raise UsageError(f"--teacher {path} changed: its sha256 is {digest[:12]}..., the run was set to "
                         f"{cfg.teacher_sha256[:12]}... (restore that file, or start a new run)")
    cfg.teacher, cfg.teacher_sha256 = str(path), digest
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _check_teacher_data(path: Path, teacher: dict, meta: DatasetMeta) -> None:
    """The teacher must take this dataset's inputs and score its classes."""
    shape = tuple(int(v) for v in teacher["shape"])
    if int(teacher["num_classes"]) != meta.num_classes or shape != tuple(meta.shape):
        raise UsageError(f"--teacher {path} was trained on {_data(teacher['name'], teacher['num_classes'], shape)}; "
                         f"this run's dataset is {_data(meta.name, meta.num_classes, tuple(meta.shape))}: the "
                         "teacher must take the same inputs and classes")


def _data(name: str, classes: int, shape: tuple[int, ...]) -> str:
    return f"{name} ({classes} classes, inputs {'x'.join(map(str, shape))})"
