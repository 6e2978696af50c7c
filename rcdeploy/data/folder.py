"""folder:PATH: PATH/<class>/<image>, images read with Pillow (or .npy arrays), sizes capped from the header."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rcdeploy.data.core import (
    DATASETS,
    TEST_FRACTION,
    TEST_SPLIT_SEED,
    _meta,
    _Raw,
    _reading,
    _stratified_split,
)
from rcdeploy.errors import UsageError

MAX_IMAGE_PIXELS = 4096 * 4096  # per image in a folder dataset, checked from the header before decoding: a
                                # small compressed file can claim gigabytes (a decompression bomb)
MAX_FOLDER_BYTES = 4 << 30  # decoded bytes of a whole folder dataset (uint8), checked as images are read


# Pillow's names of the formats read (the suffixes below): a file is decoded only as one of these, whatever it
# claims to be, so no other Pillow plugin (EPS runs Ghostscript, for one) ever sees a user's file.
_PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
_IMAGE_SUFFIXES = _PILLOW_SUFFIXES | {".npy"}


def _read_image(path: Path) -> np.ndarray:
    """One image as H x W x C: uint8 0..255, or float32 in [0, 1] (16-bit greyscale, float .npy)."""
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    with _open_image(path) as im:  # lazy: only the header is read until the pixels are asked for
        _check_pixels(path, im.size[0] * im.size[1])
        if im.mode.startswith("I;16"):
            a = np.asarray(im, dtype=np.float32) / 65535.0
        else:  # alpha dropped, palettes expanded, as the models take 1 or 3 channels
            a = np.asarray(im.convert("L" if im.mode in ("1", "L", "LA", "I", "F") else "RGB"))
    return a[:, :, None] if a.ndim == 2 else a


def _read_npy(path: Path) -> np.ndarray:
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


def _open_image(path: Path) -> Any:
    """Pillow's lazy image (header read, pixels not yet), refused as a decompression bomb past the cap."""
    from PIL import Image  # lazy: the CLI starts without it

    # Pillow's own bomb check, set to ours for this open only (the cap is Pillow's process-wide setting): it
    # refuses a header of more than 2x this many pixels before decoding; between 1x and 2x it only warns, and
    # _check_pixels makes that the error.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path, formats=_PILLOW_FORMATS)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # "Image size (N pixels) exceeds limit of ..."
        raise UsageError(_too_many_pixels(path, f"{int(found[1]):,}" if found else
                                          f"over {2 * MAX_IMAGE_PIXELS:,}")) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(path: Path | str, pixels: int) -> None:
    if pixels > MAX_IMAGE_PIXELS:
        raise UsageError(_too_many_pixels(path, f"{pixels:,}"))


def _too_many_pixels(path: Path | str, pixels: str) -> str:
    return (f"{path} holds {pixels} pixels, more than the {MAX_IMAGE_PIXELS:,} an image of a folder dataset may "
            "have (it would take gigabytes once decoded); resize it or remove it")


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
