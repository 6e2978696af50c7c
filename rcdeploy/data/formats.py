"""The standard datasets in their official on-disk layouts: scikit-learn's digits, MNIST /
Fashion-MNIST idx files, CIFAR-10/100 python pickles, SVHN .mat files."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rcdeploy.data.core import (
    DATASETS,
    TEST_FRACTION,
    TEST_SPLIT_SEED,
    _Loader,
    _meta,
    _Raw,
    _reading,
    _stratified_split,
)
from rcdeploy.data.download import _REMOTES, _fetch
from rcdeploy.errors import UsageError

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _check_labels(y: np.ndarray, n: int, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(y) != n:
        raise ValueError(f"{what}: {len(y)} labels for {n} images")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what}: labels outside 0..{num_classes - 1}")
    return y


@DATASETS.register("digits")
def _load_digits(data_dir: Path, download: bool, arg: str) -> _Raw:
    """scikit-learn's bundled 8x8 digits (1,797 images); no file, no download."""
    from sklearn.datasets import load_digits  # lazy: importing sklearn costs about a second

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # pixel counts 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    # No official test split: a fixed stratified one that never depends on `seed`.
    keep, test = _stratified_split(y, TEST_FRACTION, TEST_SPLIT_SEED)
    # 8x8 digits fill their box, so a 1-pixel shift already cuts strokes: no crops; digits never flip.
    # eps 0.1: 0.3 (the MNIST figure) is 5 of the 16 grey levels here, enough to rewrite a stroke.
    meta = _meta("digits", _DIGIT_CLASSES, (1, 8, 8), crop_padding=0, hflip=False, default_eps=0.1)
    return _Raw(meta, x[keep], y[keep], x[test], y[test])


# --- MNIST idx layout ------------------------------------------------------------------------------------

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (plain or .gz) of unsigned bytes; the header gives the real counts."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(f"not an idx{ndim}-ubyte file (header {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"header says {dims} ({int(np.prod(dims))} bytes) but the file holds {body.size}")
    return body.reshape(dims)


def _mnist_like(name: str, title: str, subdir: str, classes: Sequence[str], *, mean: float, std: float,
                default_eps: float) -> _Loader:
    def load(data_dir: Path, download: bool, arg: str) -> _Raw:
        # torchvision's layout first, then a bare raw/ folder, then the folder itself.
        candidates = (data_dir / subdir / "raw", data_dir / "raw", data_dir)
        folder = next((c for c in candidates if all(_idx_file(c, s) for s in _IDX_FILES)), None)
        if folder is None and download:
            _fetch(name, _REMOTES[name], candidates[0])
            folder = candidates[0]
        if folder is None:
            partial = next((c for c in candidates if any(_idx_file(c, s) for s in _IDX_FILES)), None)
            missing = (f" ({partial} lacks " + ", ".join(s for s in _IDX_FILES if not _idx_file(partial, s)) + ")"
                       if partial is not None else "")
            raise UsageError(
                f"{name}: no {title} idx files (train-images-idx3-ubyte[.gz] and the 3 others) under "
                f"{candidates[0]}, {candidates[1]} or {data_dir}{missing}; pass --data-dir DIR pointing at "
                f"the folder that holds {subdir}/raw, or --download"
            )
        arrays = []
        for stem in _IDX_FILES:
            path = _idx_file(folder, stem)
            assert path is not None
            with _reading(name, path):
                arrays.append(_read_idx(path, 3 if "images" in stem else 1))
        tr_x, tr_y, te_x, te_y = arrays
        with _reading(name, folder):
            tr_y = _check_labels(tr_y, len(tr_x), len(classes), "train labels")
            te_y = _check_labels(te_y, len(te_x), len(classes), "test labels")
        shape = (1, *tr_x.shape[1:])
        if te_x.shape[1:] != tr_x.shape[1:]:
            raise UsageError(f"{name}: train images are {tr_x.shape[1:]} but test images {te_x.shape[1:]} "
                             f"in {folder}; the files come from different datasets")
        # No crops or flips: robust MNIST training (Madry et al.) uses no augmentation; the objects are centred.
        meta = _meta(name, classes, shape, mean=(mean,), std=(std,), crop_padding=0, hflip=False,
                     default_eps=default_eps)
        return _Raw(meta, tr_x[:, None], tr_y, te_x[:, None], te_y)

    return load


# eps 0.3 on MNIST is Madry et al.'s standard. Fashion-MNIST uses 0.1 (as in Wong et al.'s provable-defence
# papers): its classes differ by mid-grey textures, not MNIST's near-binary strokes, so 0.3 erases them.
DATASETS.register("mnist")(
    _mnist_like("mnist", "MNIST", "MNIST", _DIGIT_CLASSES, mean=0.1307, std=0.3081, default_eps=0.3))
DATASETS.register("fashion-mnist")(
    _mnist_like("fashion-mnist", "Fashion-MNIST", "FashionMNIST", _FASHION_CLASSES, mean=0.2860, std=0.3530,
                default_eps=0.1))


# --- CIFAR python pickles --------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Loads dicts of lists and numpy arrays and nothing else: a pickle may otherwise run any code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }
    # The batches were pickled by numpy 1 (numpy.core), re-pickled copies may say numpy._core.
    _CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = self._CORE + module[module.index(".multiarray"):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        d = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"expected a dict, got {type(d).__name__}")
    # The official files (Python 2 pickles) have bytes keys; copies written by Python 3 may have str keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _decode_names(names: Sequence[Any]) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"data is {data.shape}, expected [N, 3072]")
    x = data.reshape(-1, 3, 32, 32)  # rows are 1024 red, 1024 green, 1024 blue bytes
    return x, _check_labels(np.asarray(d[label_key]), len(x), num_classes, label_key)


def _cifar_like(name: str, title: str, folder_name: str, train_files: Sequence[str], test_file: str,
                meta_file: str, names_key: str, label_key: str, num_classes: int, *,
                mean: tuple[float, float, float], std: tuple[float, float, float]) -> _Loader:
    required = (*train_files, test_file, meta_file)

    def load(data_dir: Path, download: bool, arg: str) -> _Raw:
        # data_dir/<folder_name> as torchvision lays it out, or the folder itself if the user pointed at it.
        folder = data_dir / folder_name
        if not (folder / train_files[0]).is_file() and (data_dir / train_files[0]).is_file():
            folder = data_dir
        if download and not all((folder / f).is_file() for f in required):
            _fetch(name, _REMOTES[name], data_dir)
            folder = data_dir / folder_name
        missing = [f for f in required if not (folder / f).is_file()]
        if len(missing) == len(required):
            raise UsageError(
                f"{name}: no {title} python batches under {folder}; pass --data-dir DIR pointing at the "
                f"folder that holds {folder_name}, or --download"
            )
        if missing:
            raise UsageError(f"{name}: {folder} lacks {', '.join(missing)}; the {title} download is "
                             "incomplete: replace the folder, or delete it and pass --download")
        with _reading(name, folder / meta_file):
            classes = _decode_names(_unpickle(folder / meta_file)[names_key])
            if len(classes) != num_classes:
                raise ValueError(f"{len(classes)} class names, expected {num_classes}")
        parts = []
        for f in (*train_files, test_file):
            with _reading(name, folder / f):
                parts.append(_cifar_batch(folder / f, label_key, num_classes))
        train_x = np.concatenate([p[0] for p in parts[:-1]])
        train_y = np.concatenate([p[1] for p in parts[:-1]])
        test_x, test_y = parts[-1]
        meta = _meta(name, classes, (3, 32, 32), mean=mean, std=std, crop_padding=4, hflip=True,
                     default_eps=8 / 255)
        return _Raw(meta, train_x, train_y, test_x, test_y)

    return load


# Published per-channel statistics of the full training sets (the std is the true pixel std, not the
# 0.2023/0.1994/0.2010 figures that circulate for CIFAR-10).
DATASETS.register("cifar10")(
    _cifar_like("cifar10", "CIFAR-10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "label_names", "labels", 10,
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)))
DATASETS.register("cifar100")(
    _cifar_like("cifar100", "CIFAR-100", "cifar-100-python", ["train"], "test", "meta", "fine_label_names",
                "fine_labels", 100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)))


# --- SVHN .mat -------------------------------------------------------------------------------------------


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # lazy; scipy comes with scikit-learn

    d = loadmat(str(path))
    x = np.asarray(d["X"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"X is {x.shape}, expected [32, 32, 3, N]")
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)  # HWCN -> NCHW
    y = np.asarray(d["y"]).reshape(-1).astype(np.int64)
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise ValueError("labels outside 1..10")
    return x, _check_labels(y % 10, len(x), 10, "y")  # the .mat files label the digit 0 as 10


@DATASETS.register("svhn")
def _load_svhn(data_dir: Path, download: bool, arg: str) -> _Raw:
    files = [data_dir / "train_32x32.mat", data_dir / "test_32x32.mat"]
    if download and not all(f.is_file() for f in files):
        _fetch("svhn", _REMOTES["svhn"], data_dir)
    for f in files:
        if not f.is_file():
            raise UsageError(f"svhn: no SVHN file {f}; pass --data-dir DIR pointing at the folder that holds "
                             "train_32x32.mat and test_32x32.mat, or --download")
    arrays = []
    for f in files:
        with _reading("svhn", f):
            arrays.append(_read_svhn_mat(f))
    (train_x, train_y), (test_x, test_y) = arrays
    # Digits must not flip. Crops stay small (2 px): the labelled digit is the centred one and its
    # neighbours sit at the edges.
    meta = _meta("svhn", _DIGIT_CLASSES, (3, 32, 32), mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
                 crop_padding=2, hflip=False, default_eps=8 / 255)
    return _Raw(meta, train_x, train_y, test_x, test_y)
