"""load_dataset (a registry name -> splits as float tensors on the device), and batched on-device
augmentation and batching."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rcdeploy.data.core import (
    DATASETS,
    Dataset,
    DatasetMeta,
    Split,
    _one_line,
    _stratified_split,
    dataset_names,
    default_data_dir,
)
from rcdeploy.errors import UsageError


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64) / scale
    std = x.std(axis=(0, 2, 3), dtype=np.float64) / scale
    std = np.where(std > 0, std, 1.0)  # a constant channel: dividing by 1 keeps the models finite
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _to_device(t: torch.Tensor, device: torch.device, device_arg: object) -> torch.Tensor:
    try:
        return t.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. "Torch not compiled with CUDA enabled"
        raise UsageError(f"device {device_arg!r} is not usable here ({_one_line(e)}); pass --device cpu") from None


def _split_to_device(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], device: torch.device,
                     device_arg: object) -> list[Split]:
    """Move the stored bytes once (uint8 is 4x smaller), then index and convert to float on the device."""
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # np.frombuffer views of file bytes; torch wants writable memory
        x = x.copy()
    xt = _to_device(torch.from_numpy(x), device, device_arg)
    yt = _to_device(torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)), device, device_arg)
    splits = []
    for idx in parts:
        it = torch.from_numpy(idx).to(device)
        xs = xt.index_select(0, it)
        xs = xs.float().div_(255.0) if xs.dtype == torch.uint8 else xs.float()
        splits.append(Split(xs.contiguous(), yt.index_select(0, it)))
    return splits


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False,
                 device: str | torch.device = "cpu", val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load a dataset by registry name into float [0, 1] tensors on `device`.

    `val` is a stratified hold-out of `val_fraction` of the training images, chosen by `seed`; `test` is the
    official test split (or, for datasets without one, a fixed split that no argument changes).
    """
    key, _, arg = name.partition(":")
    if key == "folder" and not arg:
        raise UsageError("dataset 'folder' needs a path: --dataset folder:PATH with PATH/<class>/<image> files")
    if key not in DATASETS or (arg and key != "folder"):
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"unknown device {device!r} ({_one_line(e)}); pass e.g. --device cpu or cuda") from None
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()

    raw = DATASETS.get(key)(root, download, arg)
    meta = raw.meta
    present = np.unique(raw.train_y)
    if meta.num_classes < 2 or len(present) < 2:
        raise UsageError(f"dataset {name!r} has training images of {len(present)} class(es) "
                         f"({', '.join(str(meta.classes[int(c)]) for c in present[:3])}); a classifier needs at least "
                         "2 (with one class every prediction is trivially right)")
    if not meta.mean:  # datasets without published statistics: measured on all non-test images
        mean, std = _channel_stats(raw.train_x)
        meta = dataclasses.replace(meta, mean=mean, std=std)
    train_idx, val_idx = _stratified_split(raw.train_y, val_fraction, seed)
    train, val = _split_to_device(raw.train_x, raw.train_y, [train_idx, val_idx], dev, device)
    (test,) = _split_to_device(raw.test_x, raw.test_y, [np.arange(len(raw.test_y))], dev, device)
    return Dataset(meta, train, val, test)


def augment(x: torch.Tensor, meta: DatasetMeta, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding of meta.crop_padding) and, where meta.hflip, random horizontal flips.

    Batched on x's device: each sample gets its own shift and flip, drawn from `generator` (on its own
    device, so a CPU generator can drive CUDA batches reproducibly). Returns a new tensor, same shape.
    """
    if x.ndim != 4:
        raise ValueError(f"augment expects a batch [N, C, H, W], got {tuple(x.shape)}")
    n, c, h, w = x.shape
    rng_device = generator.device if generator is not None else x.device
    out = x
    pad = meta.crop_padding
    if pad > 0 and n > 0:
        dy, dx = torch.randint(-pad, pad + 1, (2, n), generator=generator, device=rng_device).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))  # zeros: black borders, still in [0, 1]
        # Crop window of sample i starts at (pad + dy_i, pad + dx_i): two gathers, rows then columns.
        rows = torch.arange(h, device=x.device) + pad + dy[:, None]  # [N, H]
        cols = torch.arange(w, device=x.device) + pad + dx[:, None]  # [N, W]
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
        out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if meta.hflip and n > 0:
        flip = torch.rand(n, generator=generator, device=rng_device).to(x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out if out is not x else x.clone()


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches as slices of the on-device tensors; shuffled by one permutation per pass."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    n = len(split)
    stop = n - n % batch_size if drop_last else n
    if shuffle:
        rng_device = generator.device if generator is not None else split.x.device
        order = torch.randperm(n, generator=generator, device=rng_device).to(split.x.device)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield split.x[idx], split.y[idx]
    else:
        for start in range(0, stop, batch_size):
            yield split.x[start : start + batch_size], split.y[start : start + batch_size]
