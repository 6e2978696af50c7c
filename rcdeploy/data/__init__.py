"""Datasets by name -> float tensors in [0, 1] on the training device, and batched on-device augmentation.

airbench's recipe: the whole split lives as one tensor on the device, batches are index slices, and
augmentation is a few batched tensor ops (crops by per-sample index math, flips by mask). No DataLoader
workers, no per-sample Python transforms. Normalization lives inside the models (they read `meta.mean`
and `meta.std`), so every tensor here, and every attack, works in [0, 1] image units.

Registry names: digits (scikit-learn's bundled 8x8 digits, the no-file default), mnist, fashion-mnist,
cifar10, cifar100, svhn, and `folder:PATH` (PATH/<class>/<image>).

Layout: `core` (DatasetMeta, Split, Dataset, the DATASETS registry, the fixed test split), `formats`
(the standard datasets' on-disk layouts), `folder` (folder:PATH, read with Pillow), `download` (official
files and their checksums), `batching` (load_dataset onto the device, augment, iterate_batches).
"""

from __future__ import annotations

# formats and folder register their loaders in DATASETS on import.
from rcdeploy.data import folder, formats  # noqa: F401
from rcdeploy.data.batching import augment, iterate_batches, load_dataset
from rcdeploy.data.core import (
    DATASETS,
    TEST_FRACTION,
    TEST_SPLIT_SEED,
    Dataset,
    DatasetMeta,
    Split,
    dataset_names,
    default_data_dir,
)
from rcdeploy.data.download import _REMOTES as _REMOTES  # private: tests swap the official files
from rcdeploy.data.download import DOWNLOAD_TIMEOUT_S
from rcdeploy.data.download import _Remote as _Remote
from rcdeploy.data.folder import MAX_FOLDER_BYTES, MAX_IMAGE_PIXELS
from rcdeploy.data.formats import _IDX_FILES as _IDX_FILES

__all__ = [
    "DATASETS", "DOWNLOAD_TIMEOUT_S", "MAX_FOLDER_BYTES", "MAX_IMAGE_PIXELS", "TEST_FRACTION",
    "TEST_SPLIT_SEED", "Dataset", "DatasetMeta", "Split", "augment", "dataset_names", "default_data_dir",
    "iterate_batches", "load_dataset",
]
