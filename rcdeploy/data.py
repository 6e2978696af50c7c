"""Datasets by name -> float tensors in [0, 1] on the training device, and batched on-device augmentation.

airbench's recipe: the whole split lives as one tensor on the device, batches are index slices, and
augmentation is a few batched tensor ops (crops by per-sample index math, flips by mask). No DataLoader
workers, no per-sample Python transforms. Normalization lives inside the models (they read `meta.mean`
and `meta.std`), so every tensor here, and every attack, works in [0, 1] image units.

Registry names: digits (scikit-learn's bundled 8x8 digits, the no-file default), mnist, fashion-mnist,
cifar10, cifar100, svhn, and `folder:PATH` (PATH/<class>/<image>).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rcdeploy import validate as V
from rcdeploy.errors import UsageError
from rcdeploy.registry import Registry

log = logging.getLogger(__name__)

# Hyperparameters of this module, in one place.
TEST_FRACTION = 0.2  # share held out as the test split where a dataset has no official one (digits, folder)
TEST_SPLIT_SEED = 0  # fixed, never the `seed` argument: the test images must be the same in every run
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: a dead network fails in seconds, a slow one still works
MAX_IMAGE_PIXELS = 4096 * 4096  # per image in a folder dataset, checked from the header before decoding: a
                                # small compressed file can claim gigabytes (a decompression bomb)
MAX_FOLDER_BYTES = 4 << 30  # decoded bytes of a whole folder dataset (uint8), checked as images are read

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


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


# What a checkpoint or sidecar must hold for `DatasetMeta.from_dict` (the one schema both files share).
META_CHECK = V.mapping({
    "name": V.text(max_len=4096),
    "num_classes": V.integer(2, 1_000_000),
    "classes": V.list_of(V.one_of(V.text(), V.integer(), expected="a class name"), max_len=1_000_000),
    "shape": V.list_of(V.integer(1, 65_536), min_len=3, max_len=3),
    "mean": V.list_of(V.number(), max_len=64),
    "std": V.list_of(V.number(0, lo_open=True), max_len=64),
    "crop_padding": V.integer(0, 1024),
    "hflip": V.boolean,
    "default_eps": V.number(0, 1, lo_open=True),
}, required=("name", "num_classes", "shape"))


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


# ---------------------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Remote:
    """One official file: mirrors tried in order, checked against the published MD5."""

    filename: str
    md5: str
    urls: tuple[str, ...]
    extract: bool = False  # a .tar.gz unpacked next to itself


def _mirrors(filename: str, *bases: str) -> tuple[str, ...]:
    return tuple(base + filename for base in bases)


_MNIST_BASES = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_BASES = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_TORONTO_BASES = ("https://www.cs.toronto.edu/~kriz/", "https://cave.cs.toronto.edu/kriz/")
_SVHN_BASES = ("http://ufldl.stanford.edu/housenumbers/",)

# The checksums torchvision and the dataset pages publish.
_REMOTES: dict[str, tuple[_Remote, ...]] = {
    "mnist": tuple(
        _Remote(f, md5, _mirrors(f, *_MNIST_BASES))
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        )
    ),
    "fashion-mnist": tuple(
        _Remote(f, md5, _mirrors(f, *_FASHION_BASES))
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    ),
    "cifar10": (
        _Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                _mirrors("cifar-10-python.tar.gz", *_TORONTO_BASES), extract=True),
    ),
    "cifar100": (
        _Remote("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                _mirrors("cifar-100-python.tar.gz", *_TORONTO_BASES), extract=True),
    ),
    "svhn": (
        _Remote("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", _mirrors("train_32x32.mat", *_SVHN_BASES)),
        _Remote("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", _mirrors("test_32x32.mat", *_SVHN_BASES)),
    ),
}


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


# --- folder:PATH -----------------------------------------------------------------------------------------

_PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
_IMAGE_SUFFIXES = _PILLOW_SUFFIXES | {".npy"}


def _have_pillow() -> bool:
    return importlib.util.find_spec("PIL") is not None


def _read_image(path: Path) -> np.ndarray:
    """One image as H x W x C: uint8 0..255, or float32 in [0, 1] (16-bit PNGs, float .npy)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        a = np.load(path, allow_pickle=False, mmap_mode="r")  # the header only: the shape is checked first
        _check_pixels(path, int(np.prod(a.shape[:2])) if a.ndim >= 2 else a.size)
        a = np.array(a)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3 or a.shape[2] not in (1, 3):
            raise ValueError(f"array is {a.shape}; expected H x W or H x W x C with C 1 or 3")
        if a.dtype == np.uint8:
            return a
        if np.issubdtype(a.dtype, np.integer) and a.size and 0 <= a.min() and a.max() <= 255:
            return a.astype(np.uint8)
        if np.issubdtype(a.dtype, np.floating) and a.size and 0.0 <= a.min() and a.max() <= 1.0:
            return a.astype(np.float32)
        raise ValueError(f"{a.dtype} values must be integers 0..255 or floats in [0, 1]")
    if _have_pillow():
        from PIL import Image

        with Image.open(path) as im:  # lazy: only the header is read until the pixels are asked for
            _check_pixels(path, im.size[0] * im.size[1])
            if im.mode.startswith("I;16"):
                a = np.asarray(im, dtype=np.float32) / 65535.0
            else:
                a = np.asarray(im.convert("L" if im.mode in ("1", "L", "LA", "I", "F") else "RGB"))
        return a[:, :, None] if a.ndim == 2 else a
    if suffix == ".png":
        return _decode_png(path.read_bytes(), str(path))
    raise UsageError(f"cannot read {path} without Pillow: pip install pillow, or save the images as .png or .npy")


def _check_pixels(path: Path | str, pixels: int) -> None:
    if pixels > MAX_IMAGE_PIXELS:
        raise UsageError(f"{path} holds {pixels:,} pixels, more than the {MAX_IMAGE_PIXELS:,} an image of a folder "
                         "dataset may have (it would take gigabytes once decoded); resize it or remove it")


def _decode_png(data: bytes, name: str = "PNG") -> np.ndarray:
    """A dependency-free PNG decoder for when Pillow is absent: any bit depth and colour type, not interlaced.

    Alpha is dropped and palettes are expanded to RGB, as with Pillow's convert("RGB").
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file (bad signature)")
    pos, idat, palette, header = 8, [], None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length  # length, type, body, CRC
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth not in (1, 2, 4, 8, 16) or interlace:
        raise ValueError(f"PNG with bit depth {depth}, colour type {color}, interlace {interlace} needs Pillow "
                         "(pip install pillow)")
    bpp = max(1, channels * depth // 8)  # bytes per pixel, at least 1: the filters' left neighbour distance
    stride = (width * channels * depth + 7) // 8
    _check_pixels(name, width * height)  # from the header, before a byte is inflated
    expected = height * (stride + 1)
    raw = np.frombuffer(zlib.decompressobj().decompress(b"".join(idat), expected + 1), np.uint8)
    if raw.size != expected:
        raise ValueError(f"PNG data holds {raw.size} bytes, expected {height * (stride + 1)}")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for r in range(height):
        kind, line = rows[r, 0], rows[r, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: running sum along each byte lane, mod 256
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):  # Average, Paeth: each byte needs its decoded left neighbour -> sequential
            cur = _unfilter_sequential(int(kind), line.tolist(), prev.tolist(), bpp)
        else:
            raise ValueError(f"unknown PNG filter type {kind} in row {r}")
        out[r] = cur
        prev = out[r]
    if depth == 16:
        img: np.ndarray = out.view(">u2").astype(np.float32).reshape(height, width, channels) / 65535.0
    elif depth < 8:  # 1, 2 or 4 bits per sample (grey or palette index), rows padded to whole bytes
        bits = np.unpackbits(out, axis=1)[:, : width * depth].reshape(height, width, depth)
        img = (bits @ (1 << np.arange(depth - 1, -1, -1))).astype(np.uint8)[:, :, None]
        if color == 0:
            img = img * np.uint8(255 // ((1 << depth) - 1))  # stretch to 0..255 as Pillow's "L" does
    else:
        img = out.reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise ValueError("palette PNG without PLTE")
        img = palette[img[:, :, 0]]
    if color in (4, 6):
        img = img[:, :, :-1]  # drop alpha
    return img


def _unfilter_sequential(kind: int, line: list[int], prev: list[int], bpp: int) -> np.ndarray:
    cur = [0] * len(line)
    for i, v in enumerate(line):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (v + (a + b) // 2) & 0xFF
        else:
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (v + pred) & 0xFF
    return np.asarray(cur, np.uint8)


def _class_dirs(root: Path, label: str) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UsageError(f"{label}: no class folders under {root}; expected {root}/<class>/<image> files")
    return classes


def _read_class_folders(root: Path, classes: Sequence[str], label: str, first: list[tuple[Path, tuple[int, ...]]],
                        *, require_all: bool) -> tuple[list[np.ndarray], list[int]]:
    """Every image under root/<class>/ (recursively, sorted), checked against the first image's shape."""
    present = _class_dirs(root, label)
    stray = [c for c in present if c not in classes]
    if stray:
        raise UsageError(f"{label}: {root} has class folders {stray} that the training folder lacks")
    images: list[np.ndarray] = []
    labels: list[int] = []
    decoded = 0  # bytes of the images read so far
    for index, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files and require_all:
            raise UsageError(f"{label}: class folder {folder} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        for path in files:
            with _reading(label, path, "replace or remove that file"):
                a = _read_image(path)
            decoded += a.nbytes
            if decoded > MAX_FOLDER_BYTES:
                raise UsageError(f"{label}: the images up to {path} already take {decoded >> 20:,} MiB decoded, "
                                 f"more than the {MAX_FOLDER_BYTES >> 30} GiB a folder dataset may hold; use fewer "
                                 "or smaller images")
            if not first:
                first.append((path, a.shape))
            elif a.shape != first[0][1]:
                h, w, c = a.shape
                fh, fw, fc = first[0][1]
                raise UsageError(f"{label}: {path} is {h}x{w} with {c} channel(s) but {first[0][0]} is {fh}x{fw} "
                                 f"with {fc}; all images must share one size (rcdeploy resizes nothing)")
            images.append(a)
            labels.append(index)
    return images, labels


def _stack_images(images: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """H x W x C images -> [N, C, H, W], uint8 if every image is, else float32 in [0, 1]."""
    h, w, c = shape
    if not images:
        return np.zeros((0, c, h, w), np.uint8)
    if all(a.dtype == np.uint8 for a in images):
        return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
    as_float = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in images]
    return np.ascontiguousarray(np.stack(as_float).transpose(0, 3, 1, 2))


@DATASETS.register("folder")
def _load_folder(data_dir: Path, download: bool, arg: str) -> _Raw:
    """PATH/<class>/<image>; PATH/train + PATH/test (or val) when present, else a fixed seeded split."""
    path = Path(arg).expanduser()
    if not path.is_absolute() and not path.exists() and (data_dir / path).exists():
        path = data_dir / path
    path = path.resolve()
    label = f"folder:{arg}"
    if not path.is_dir():
        raise UsageError(f"{label}: no folder at {path}; pass --dataset folder:PATH with PATH/<class>/<image> files")
    train_dir = path / "train"
    test_dir = next((d for d in (path / "test", path / "val") if d.is_dir()), None)
    first: list[tuple[Path, tuple[int, ...]]] = []  # the first image read, whose size all others must have
    if train_dir.is_dir():
        if test_dir is None:
            raise UsageError(f"{label}: {path} has train/ but neither test/ nor val/; add one, or put the class "
                             "folders directly under PATH for a fixed seeded split")
        classes = _class_dirs(train_dir, label)
        tr_imgs, tr_y = _read_class_folders(train_dir, classes, label, first, require_all=True)
        te_imgs, te_y = _read_class_folders(test_dir, classes, label, first, require_all=False)
        shape = first[0][1]
        train_x, test_x = _stack_images(tr_imgs, shape), _stack_images(te_imgs, shape)
        if train_x.dtype != test_x.dtype:  # one set float (16-bit or float .npy), the other uint8
            train_x, test_x = _as_unit_float(train_x), _as_unit_float(test_x)
        train_y, test_y = np.asarray(tr_y, np.int64), np.asarray(te_y, np.int64)
    else:
        classes = _class_dirs(path, label)
        imgs, ys = _read_class_folders(path, classes, label, first, require_all=True)
        x, y = _stack_images(imgs, first[0][1]), np.asarray(ys, np.int64)
        keep, test = _stratified_split(y, TEST_FRACTION, TEST_SPLIT_SEED)
        train_x, train_y, test_x, test_y = x[keep], y[keep], x[test], y[test]
    h, w, c = first[0][1]
    # Unknown content: flips may change the label (text, digits), so none; crops of 1/8 of the side, as CIFAR's
    # 4 px at 32, only where the image is big enough that a shift keeps the object. eps 8/255: natural images.
    crop = round(min(h, w) / 8) if min(h, w) >= 16 else 0
    meta = _meta(f"folder:{path}", classes, (c, h, w), crop_padding=crop, hflip=False, default_eps=8 / 255)
    return _Raw(meta, train_x, train_y, test_x, test_y)


def _as_unit_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


# --- download --------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # integrity against the published sums, not security
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(name: str, remotes: Sequence[_Remote], dest: Path) -> None:
    """Download (unless already there with the right MD5) and extract the official files into dest."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{name}: cannot create {dest} for the download ({_one_line(e)}); pass --data-dir DIR") from None
    for remote in remotes:
        target = dest / remote.filename
        if not (target.is_file() and _md5(target) == remote.md5):
            _download(name, remote, target)
        if remote.extract:
            with _reading(name, target):
                with tarfile.open(target, "r:gz") as tar:
                    # The "data" filter refuses absolute paths, links out of dest and device files.
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(dest, filter="data")
                    else:  # Python < 3.11.4 without the filters: the archives are checked by MD5 first
                        tar.extractall(dest)


def _download(name: str, remote: _Remote, target: Path) -> None:
    errors = []
    part = target.with_name(target.name + ".part")
    for url in remote.urls:
        log.info("%s: downloading %s", name, url)
        h = hashlib.md5(usedforsecurity=False)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, part.open("wb") as out:
                for block in iter(lambda r=response: r.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
        except Exception as e:  # URLError, HTTPError, timeouts, resets: each one means "try the next mirror"
            errors.append(f"{url}: {_one_line(e)}")
            part.unlink(missing_ok=True)
            continue
        if h.hexdigest() != remote.md5:
            errors.append(f"{url}: checksum mismatch (MD5 {h.hexdigest()}, expected {remote.md5})")
            part.unlink(missing_ok=True)
            continue
        part.replace(target)
        return
    raise UsageError(f"{name}: download of {remote.filename} failed ({'; '.join(errors)}); check the network, or "
                     f"fetch it by hand into {target.parent} and pass --data-dir")


# ---------------------------------------------------------------------------------------------------------
# Public entry points


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
