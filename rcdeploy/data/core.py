"""What every part of rcdeploy.data shares: the typed dataset meta and splits, the loader registry,
the fixed test split, and the rule that a file which does not parse is one UsageError line."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcdeploy.errors import UsageError
from rcdeploy.registry import Registry

TEST_FRACTION = 0.2  # share held out as the test split where a dataset has no official one (digits, folder)
TEST_SPLIT_SEED = 0  # fixed, never the `seed` argument: the test images must be the same in every run


@dataclass(frozen=True)
class DatasetMeta:
    """What a model, an attack and the ONNX sidecar need to know about a dataset."""

    name: str  # registry name, e.g. "cifar10" or "folder:/abs/path"
    num_classes: int
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, of the training images in [0, 1]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding in pixels; 0 = no crop augmentation
    hflip: bool  # whether horizontal flips keep the label (never for digits)
    default_eps: float  # L-inf attack radius in [0, 1] image units that the literature uses

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples become lists), for checkpoints and the ONNX sidecar."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMeta:
        """Inverse of `to_dict`."""
        return cls(
            name=str(d["name"]),
            num_classes=int(d["num_classes"]),
            classes=tuple(str(c) for c in d["classes"]),
            shape=tuple(int(s) for s in d["shape"]),  # type: ignore[arg-type]
            mean=tuple(float(m) for m in d["mean"]),
            std=tuple(float(s) for s in d["std"]),
            crop_padding=int(d["crop_padding"]),
            hflip=bool(d["hflip"]),
            default_eps=float(d["default_eps"]),
        )




def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass
class Split:
    """Images float32 [N, C, H, W] in [0, 1] and labels int64 [N], on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    """A dataset's meta and its three splits, all on one device."""

    meta: DatasetMeta
    train: Split
    val: Split  # fixed seeded hold-out from the training set: used to pick checkpoints
    test: Split  # the official test split, or a fixed one where there is none (never used to pick checkpoints)


# Loaders: each returns the arrays as stored on disk; load_dataset splits, converts and moves them.


@dataclass
class _Raw:
    meta: DatasetMeta  # mean/std left empty -> computed from train_x
    train_x: np.ndarray  # [N, C, H, W], uint8 0..255 or float32 in [0, 1]; train and val together
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray


# (data_dir, download, argument after "name:") -> arrays
_Loader = Callable[[Path, bool, str], _Raw]
DATASETS: Registry[_Loader] = Registry("dataset")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


_DOWNLOAD_HINT = "the file looks corrupt: delete it and pass --download, or replace it"


@contextmanager
def _reading(name: str, path: Path, hint: str = _DOWNLOAD_HINT) -> Iterator[None]:
    """A file that does not parse is bad user input: one UsageError line, never a traceback.

    `hint` says what fixes it: a download for the standard datasets, a replacement for the user's own files.
    """
    try:
        yield
    except UsageError:
        raise
    except MemoryError:
        raise UsageError(f"{name}: {path} does not fit in memory; use smaller files") from None
    except Exception as e:  # parsers raise many types (UnpicklingError, EOFError, zlib.error, ValueError...)
        raise UsageError(f"{name}: cannot read {path} ({_one_line(e)}); {hint}") from None


def _meta(name: str, classes: Sequence[str], shape: tuple[int, int, int], *, mean: Sequence[float] = (),
          std: Sequence[float] = (), crop_padding: int, hflip: bool, default_eps: float) -> DatasetMeta:
    return DatasetMeta(name, len(classes), tuple(classes), shape, tuple(mean), tuple(std),
                       crop_padding, hflip, default_eps)


def default_data_dir() -> Path:
    """$RCDEPLOY_DATA if set, else ./data (absolute, so error messages name a clear path)."""
    env = os.environ.get("RCDEPLOY_DATA")
    return Path(env).expanduser().resolve() if env else Path.cwd() / "data"


def dataset_names() -> list[str]:
    """Registry names, with the folder loader shown as it is used: folder:PATH."""
    return [n if n != "folder" else "folder:PATH" for n in DATASETS.names()]


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with round(fraction * n_c) of every class held out, reproducible from seed."""
    rng = np.random.default_rng(seed)
    kept, held = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = min(int(round(fraction * len(idx))), len(idx) - 1)  # every class keeps a training image
        held.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))
