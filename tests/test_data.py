"""rcdeploy.data: every on-disk layout really read, deterministic splits, batched augmentation, clear errors.

CIFAR-10 and MNIST come from the real slices in ../shared/data (skipped when absent); CIFAR-100, SVHN,
Fashion-MNIST (.gz) and folder:PATH are written here in their real on-disk layouts with synthetic pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rcdeploy import data
from rcdeploy.data import (
    Dataset,
    DatasetMeta,
    Split,
    augment,
    dataset_names,
    default_data_dir,
    iterate_batches,
    load_dataset,
)
from rcdeploy.errors import UsageError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_SLICE = SHARED_DATA / "cifar10-slice"
MNIST_SLICE = SHARED_DATA / "mnist"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data slice {path} is absent (it ships only in the development workspace)")
    return path


# --- writers for the real on-disk layouts -------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """[n, 3, 32, 32] uint8 where image i has value (offset + i) % 256 in red, +1 in green, +2 in blue."""
    base = (offset + np.arange(n))[:, None, None, None] + np.arange(3)[None, :, None, None]
    return np.broadcast_to(base % 256, (n, 3, 32, 32)).astype(np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_cifar10(folder: Path, per_batch: int) -> None:
    """cifar-10-batches-py with bytes keys, as the official Python 2 pickles read with encoding='bytes'."""
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    for i, f in enumerate([*[f"data_batch_{k}" for k in range(1, 6)], "test_batch"]):
        x = _cifar_images(per_batch, 1000 * i)
        _pickle(folder / f, {b"data": x.reshape(per_batch, -1), b"labels": [j % 10 for j in range(per_batch)]})


def _png(img: np.ndarray, filters: list[int]) -> bytes:
    """PNG writer (8-bit grey/RGB/RGBA) that cycles through the given filter types row by row."""
    h, w, c = img.shape
    color = {1: 0, 3: 2, 4: 6}[c]
    rows = img.reshape(h, w * c).astype(np.int32)
    out = bytearray()
    for r in range(h):
        x = rows[r]
        up = rows[r - 1] if r else np.zeros_like(x)
        left = np.concatenate([np.zeros(c, np.int32), x[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int32), up[:-c]])
        f = filters[r % len(filters)]
        if f == 0:
            pred = np.zeros_like(x)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = up
        elif f == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out += bytes([f]) + ((x - pred) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b"")


def _all_rows(split: Split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x.reshape(len(split), -1)}


# --- names and errors ------------------------------------------------------------------------------------------


def test_names_and_unknown_dataset_lists_known_names():
    names = dataset_names()
    assert names == ["cifar10", "cifar100", "digits", "fashion-mnist", "folder:PATH", "mnist", "svhn"]
    with pytest.raises(UsageError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value)
    for n in names:
        assert n in str(err.value)
    with pytest.raises(UsageError, match="folder:PATH"):
        load_dataset("folder")
    with pytest.raises(UsageError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


@pytest.mark.parametrize(
    ("name", "looked_at"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
        ("mnist", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST/raw"),
    ],
)
def test_missing_data_names_the_path_and_the_fix(tmp_path, name, looked_at):
    with pytest.raises(UsageError) as err:
        load_dataset(name, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{tmp_path}/{looked_at}" in msg
    assert "--data-dir" in msg and "--download" in msg


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(UsageError, match=str(tmp_path / "nope")):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RCDEPLOY_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.delenv("RCDEPLOY_DATA")
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path / "data"


# --- digits (embedded) -----------------------------------------------------------------------------------------


def test_digits_shapes_ranges_labels_and_meta():
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset)
    assert ds.meta.shape == (1, 8, 8) and ds.meta.num_classes == 10 and ds.meta.classes[3] == "3"
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert abs(len(ds.test) - 0.2 * 1797) < 6 and abs(len(ds.val) - 0.1 * (1797 - len(ds.test))) < 6
    for s in (ds.train, ds.val, ds.test):
        assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
        assert s.x.shape[1:] == (1, 8, 8) and s.x.shape[0] == len(s)
        assert s.x.min().item() == 0.0 and s.x.max().item() == 1.0
        assert torch.bincount(s.y, minlength=10).min() > 0  # stratified: every class in every split
    # Pixels are sklearn's counts 0..16 divided by 16: exactly 17 distinct levels.
    assert torch.unique(ds.train.x).numel() == 17
    # No published statistics for digits: measured on the non-test images, per channel.
    pool = torch.cat([ds.train.x, ds.val.x])
    assert ds.meta.mean[0] == pytest.approx(pool.mean().item(), abs=1e-5)
    assert ds.meta.std[0] == pytest.approx(pool.std().item(), abs=1e-3)
    assert ds.meta.hflip is False and ds.meta.default_eps == 0.1


def test_digits_split_is_deterministic_disjoint_seeded_and_test_fixed():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)  # same seed -> same split
    assert torch.equal(a.test.x, c.test.x) and torch.equal(a.test.y, c.test.y)  # test never moves
    assert not torch.equal(a.val.x, c.val.x)  # another seed -> another val
    # Digits has no duplicate images, so rows identify images: the three splits are disjoint and the
    # train+val pool is the same whatever the seed.
    tr, va, te = _all_rows(a.train), _all_rows(a.val), _all_rows(a.test)
    assert len(tr) == len(a.train) and not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va == _all_rows(c.train) | _all_rows(c.val)
    assert len(va ^ _all_rows(c.val)) > 0.5 * len(va)


def test_meta_to_dict_is_json_and_round_trips():
    meta = load_dataset("digits").meta
    d = json.loads(json.dumps(meta.to_dict()))
    assert d["shape"] == [1, 8, 8] and d["num_classes"] == 10 and d["classes"][0] == "0"
    assert DatasetMeta.from_dict(d) == meta


# --- MNIST idx (real slice) and Fashion-MNIST .gz (synthetic) --------------------------------------------------


def test_mnist_real_slice_header_counts_and_pixels():
    root = _need(MNIST_SLICE)
    raw = root / "MNIST" / "raw"
    t0 = time.perf_counter()
    ds = load_dataset("mnist", root)
    elapsed = time.perf_counter() - t0
    assert len(ds.train) + len(ds.val) == 3678 and len(ds.test) == 10_000
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.meta.shape == (1, 28, 28)
    assert ds.test.x.min().item() == 0.0 and ds.test.x.max().item() == 1.0
    assert set(ds.test.y.tolist()) == set(range(10))
    # The test split is the t10k file in order: compare with the bytes after the 16-byte header.
    blob = (raw / "t10k-images-idx3-ubyte").read_bytes()
    first = np.frombuffer(blob, np.uint8, count=784, offset=16).reshape(1, 28, 28) / 255.0
    assert np.allclose(ds.test.x[0].numpy(), first)
    assert ds.test.y[0].item() == (raw / "t10k-labels-idx1-ubyte").read_bytes()[8]
    # The published MNIST mean/std also describe this slice: a wrong layout would not match.
    assert ds.test.x.mean().item() == pytest.approx(ds.meta.mean[0], abs=0.01)
    assert ds.test.x.std().item() == pytest.approx(ds.meta.std[0], abs=0.01)
    assert ds.meta.default_eps == 0.3 and ds.meta.crop_padding == 0 and not ds.meta.hflip
    assert elapsed < 5.0
    # The same files are found when data_dir is the raw folder itself.
    assert len(load_dataset("mnist", raw).test) == 10_000


def test_fashion_mnist_gz_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    train = (np.arange(30)[:, None, None] * 8 + np.zeros((1, 28, 28), np.int64)) % 256
    test = np.full((7, 28, 28), 255)
    test[:, 0, 0] = 0
    _write_idx(raw / "train-images-idx3-ubyte", train, gz=True)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10, gz=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", test, gz=True)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(7) % 10, gz=True)
    ds = load_dataset("fashion-mnist", tmp_path, val_fraction=0.0)
    assert ds.meta.classes[0] == "T-shirt/top" and ds.meta.classes[9] == "Ankle boot"
    assert len(ds.train) == 30 and len(ds.val) == 0 and len(ds.test) == 7
    assert torch.allclose(ds.train.x[:, 0, 5, 5], torch.arange(30) * 8 / 255.0)
    assert ds.train.y.tolist() == [i % 10 for i in range(30)]
    assert ds.test.x[0, 0, 0, 0].item() == 0.0 and ds.test.x[0, 0, 1, 1].item() == 1.0
    assert ds.meta.default_eps == 0.1


def test_corrupt_idx_is_a_usage_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    for stem in data._IDX_FILES:
        _write_idx(raw / stem, np.zeros((4, 28, 28)) if "images" in stem else np.zeros(4), gz=False)
    img = raw / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-100])  # truncated: the header promises more pixels
    with pytest.raises(UsageError, match=str(img)):
        load_dataset("mnist", tmp_path)


# --- CIFAR-10 (real slice), CIFAR-100 and download (synthetic) -------------------------------------------------


def test_cifar10_real_slice():
    root = _need(CIFAR_SLICE)
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", root)
    elapsed = time.perf_counter() - t0
    assert len(ds.train) + len(ds.val) == 4660 and len(ds.test) == 932
    assert abs(len(ds.val) - 466) <= 5
    assert ds.meta.shape == (3, 32, 32) and ds.meta.classes[0] == "airplane" and ds.meta.classes[9] == "truck"
    assert ds.meta.hflip and ds.meta.crop_padding == 4 and ds.meta.default_eps == pytest.approx(8 / 255)
    assert ds.train.x.min().item() == 0.0 and ds.train.x.max().item() == 1.0
    # First test image against the pickle read independently: channel-major rows of 1024 bytes.
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert np.allclose(ds.test.x[0].numpy(), batch[b"data"][0].reshape(3, 32, 32) / 255.0)
    assert ds.test.y.tolist() == list(batch[b"labels"])
    # Per-channel means of the slice sit at the published CIFAR-10 ones (R > G > B); a pixel-major
    # misread would blur them to one value.
    pool = torch.cat([ds.train.x, ds.val.x])
    for ch, published in enumerate(ds.meta.mean):
        assert pool[:, ch].mean().item() == pytest.approx(published, abs=0.01)
    assert elapsed < 5.0


def test_cifar10_val_seeded_and_stratified():
    root = _need(CIFAR_SLICE)
    a, b = load_dataset("cifar10", root, seed=0), load_dataset("cifar10", root, seed=3)
    assert torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.val.y, b.val.y) or not torch.equal(a.val.x, b.val.x)
    counts = torch.bincount(a.val.y, minlength=10)
    pool_counts = torch.bincount(torch.cat([a.train.y, a.val.y]), minlength=10)
    assert torch.all((counts - 0.1 * pool_counts).abs() <= 1)


def test_cifar100_layout_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    fine = [f"class{i:03d}".encode() for i in range(100)]
    _pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    x = _cifar_images(300, 0)
    y = [i % 100 for i in range(300)]
    _pickle(folder / "train", {b"data": x.reshape(300, -1), b"fine_labels": y, b"coarse_labels": [v // 5 for v in y]})
    _pickle(folder / "test", {b"data": x[:50].reshape(50, -1), b"fine_labels": y[:50], b"coarse_labels": [0] * 50})
    ds = load_dataset("cifar100", tmp_path)
    assert ds.meta.num_classes == 100 and ds.meta.classes[42] == "class042"
    assert len(ds.train) + len(ds.val) == 300 and len(ds.test) == 50
    assert ds.test.y.tolist() == y[:50]  # fine labels, not coarse
    assert torch.allclose(ds.test.x[7, :, 3, 3], torch.tensor([7.0, 8.0, 9.0]) / 255.0)  # channel order kept


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, 4)
    # A pickle that would call os.system on load: the loader must refuse it, not run it.
    evil = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    (folder / "data_batch_3").write_bytes(evil)
    with pytest.raises(UsageError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="corrupt"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def _cifar10_archive(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    _write_cifar10(src / "cifar-10-batches-py", 6)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checksum_and_extract_via_file_url(tmp_path, monkeypatch):
    archive, md5 = _cifar10_archive(tmp_path)
    remote = data._Remote("cifar-10-python.tar.gz", md5, (archive.as_uri(),), extract=True)
    monkeypatch.setitem(data._REMOTES, "cifar10", (remote,))
    ds = load_dataset("cifar10", tmp_path / "data", download=True)
    assert len(ds.train) + len(ds.val) == 30 and len(ds.test) == 6
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    # A file that does not match the published checksum is rejected and not left behind.
    bad = data._Remote("cifar-10-python.tar.gz", "0" * 32, (archive.as_uri(),), extract=True)
    monkeypatch.setitem(data._REMOTES, "cifar10", (bad,))
    with pytest.raises(UsageError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "other", download=True)
    assert not list((tmp_path / "other").iterdir())


def test_download_without_network_fails_fast_with_reason(tmp_path, monkeypatch):
    # Port 9 on localhost: nothing listens, the connection is refused at once (no internet needed to test).
    dead = data._Remote("train_32x32.mat", "0" * 32, ("http://127.0.0.1:9/train_32x32.mat",))
    monkeypatch.setitem(data._REMOTES, "svhn", (dead,))
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as err:
        load_dataset("svhn", tmp_path, download=True)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "download of train_32x32.mat failed" in msg and "127.0.0.1:9" in msg and "refused" in msg.lower()


# --- SVHN .mat (synthetic) -------------------------------------------------------------------------------------


def test_svhn_mat_layout_and_label_10_is_zero(tmp_path):
    from scipy.io import savemat

    n = 12
    x = np.zeros((32, 32, 3, n), np.uint8)  # SVHN stores H, W, C, N
    x[5, 7, 2, :] = np.arange(n) * 20  # blue pixel (row 5, col 7) carries the image index
    y = (np.arange(n) % 10 + 1).reshape(n, 1)  # labels 1..10, where 10 is the digit 0
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    savemat(tmp_path / "test_32x32.mat", {"X": x[..., :4], "y": y[:4]})
    ds = load_dataset("svhn", tmp_path, val_fraction=0.0)
    assert ds.meta.shape == (3, 32, 32) and not ds.meta.hflip
    assert len(ds.train) == n and len(ds.test) == 4
    assert ds.train.y.tolist() == [(i % 10 + 1) % 10 for i in range(n)]
    assert 0 in ds.train.y.tolist() and 10 not in ds.train.y.tolist()
    assert torch.allclose(ds.train.x[:, 2, 5, 7], torch.arange(n) * 20 / 255.0)
    assert ds.train.x.sum().item() == pytest.approx(float(ds.train.x[:, 2, 5, 7].sum()))
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(UsageError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path)


# --- folder:PATH -----------------------------------------------------------------------------------------------


def _folder_image(cls: int, i: int) -> np.ndarray:
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :, 0] = 10 * cls + i  # red: which image
    img[2, 3, 1] = 200  # a marker that fixes orientation
    return img


def test_folder_with_train_test_subfolders_png_and_npy(tmp_path):
    for split, count in (("train", 5), ("test", 2)):
        for cls, name in enumerate(["cat", "dog"]):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(count):
                if i == 0:
                    np.save(d / f"{i}.npy", _folder_image(cls, i))
                else:
                    (d / f"{i}.png").write_bytes(_png(_folder_image(cls, i), [0, 1, 2, 3, 4]))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.2, seed=0)
    assert ds.meta.classes == ("cat", "dog") and ds.meta.shape == (3, 16, 16)
    assert ds.meta.name == f"folder:{tmp_path.resolve()}"
    assert len(ds.train) == 8 and len(ds.val) == 2 and len(ds.test) == 4
    assert ds.test.y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(ds.test.x[:, 0, 0, 0] * 255, torch.tensor([0.0, 1.0, 10.0, 11.0]))
    assert torch.all(ds.test.x[:, 1, 2, 3] * 255 == 200) and (ds.test.x[:, 1].sum() * 255).item() == pytest.approx(800)
    assert len(ds.meta.mean) == 3 and ds.meta.std[1] > 0  # measured on train
    assert ds.meta.crop_padding == 2 and not ds.meta.hflip


def test_folder_without_split_is_fixed_and_seeded(tmp_path):
    for cls in range(3):
        d = tmp_path / f"c{cls}"
        d.mkdir()
        for i in range(10):
            np.save(d / f"{i:02d}.npy", np.full((4, 4), 20 * cls + i, np.uint8))
    a = load_dataset(f"folder:{tmp_path}", seed=0, val_fraction=0.25)
    b = load_dataset(f"folder:{tmp_path}", seed=1, val_fraction=0.25)
    assert len(a.test) == 6 and torch.bincount(a.test.y).tolist() == [2, 2, 2]
    assert torch.equal(a.test.x, b.test.x)  # the test split does not depend on seed
    assert not torch.equal(a.val.x, b.val.x)
    tr, va, te = _all_rows(a.train), _all_rows(a.val), _all_rows(a.test)
    assert len(tr | va | te) == 30 and len(tr) + len(va) + len(te) == 30
    assert a.meta.shape == (1, 4, 4) and a.meta.crop_padding == 0


def test_folder_odd_size_names_the_file(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        np.save(tmp_path / cls / "0.npy", np.zeros((8, 8), np.uint8))
    odd = tmp_path / "b" / "1.png"
    odd.write_bytes(_png(np.zeros((9, 8, 1), np.uint8), [0]))
    with pytest.raises(UsageError) as err:
        load_dataset(f"folder:{tmp_path}")
    assert str(odd) in str(err.value) and "9x8" in str(err.value)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_every_filter_type_reads_exactly(channels, tmp_path):
    # Folder images are read with Pillow; every filter type, against known pixels.
    rng = np.random.default_rng(channels)
    img = rng.integers(0, 256, (11, 7, channels), dtype=np.uint8)
    for filters in ([0], [1], [2], [3], [4], [4, 3, 2, 1, 0]):
        path = tmp_path / f"{''.join(map(str, filters))}.png"
        path.write_bytes(_png(img, filters))
        out = data.folder._read_image(path)
        assert np.array_equal(out, img[:, :, : 3 if channels == 4 else channels])  # alpha dropped


# --- augment and batches ---------------------------------------------------------------------------------------


def _meta(pad: int, hflip: bool) -> DatasetMeta:
    return DatasetMeta("t", 2, ("a", "b"), (1, 12, 12), (0.5,), (0.25,), pad, hflip, 0.1)


def test_augment_crop_shifts_a_known_image():
    n, pad = 256, 2
    x = torch.zeros(n, 1, 12, 12)
    x[:, 0, 6, 5] = 1.0  # one bright pixel, far enough from the border to survive any shift
    out = augment(x, _meta(pad, False), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.all(out.sum((1, 2, 3)) == 1.0)  # moved, never duplicated or lost
    pos = out.reshape(n, -1).argmax(1)
    rows, cols = pos // 12, pos % 12
    assert (rows - 6).abs().max() <= pad and (cols - 5).abs().max() <= pad
    assert len(set(zip(rows.tolist(), cols.tolist()))) == (2 * pad + 1) ** 2  # all 25 shifts occur
    # Zero padding: a white image keeps (H - |dy|) x (W - |dx|) white pixels.
    ones = augment(torch.ones(64, 1, 12, 12), _meta(pad, False), torch.Generator().manual_seed(1))
    sums = ones.sum((1, 2, 3))
    assert ones.min() == 0.0 and ones.max() == 1.0 and (sums < 144).any()
    assert set(sums.tolist()) <= {float((12 - a) * (12 - b)) for a in range(pad + 1) for b in range(pad + 1)}


def test_augment_flips_only_when_meta_says():
    x = torch.rand(200, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    same = augment(x, _meta(0, False), torch.Generator().manual_seed(0))
    assert torch.equal(same, x) and same is not x
    out = augment(x, _meta(0, True), torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept) and 60 < flipped.sum() < 140
    again = augment(x, _meta(0, True), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # same generator seed, same augmentation


def test_augment_on_real_cifar_keeps_range():
    ds = load_dataset("cifar10", _need(CIFAR_SLICE))
    xb = ds.train.x[:512]
    t0 = time.perf_counter()
    out = augment(xb, ds.meta, torch.Generator().manual_seed(0))
    assert time.perf_counter() - t0 < 2.0
    assert out.shape == xb.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, xb)
    assert torch.equal(xb, ds.train.x[:512])  # the input is not modified


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_augment_and_batches_on_cuda_with_cpu_generator():
    ds = load_dataset("digits", device="cuda")
    assert ds.train.x.is_cuda
    out = augment(ds.train.x[:64], data.DatasetMeta.from_dict({**ds.meta.to_dict(), "crop_padding": 1, "hflip": True}),
                  torch.Generator().manual_seed(0))
    assert out.is_cuda and out.shape == (64, 1, 8, 8)
    xb, yb = next(iterate_batches(ds.train, 32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert xb.is_cuda and yb.is_cuda and len(yb) == 32


def test_iterate_batches_covers_each_sample_once():
    split = Split(torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1), torch.arange(10))
    plain = list(iterate_batches(split, 4, shuffle=False))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    assert torch.cat([y for _, y in plain]).tolist() == list(range(10))
    shuffled = list(iterate_batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    ys = torch.cat([y for _, y in shuffled])
    assert sorted(ys.tolist()) == list(range(10)) and ys.tolist() != list(range(10))
    assert all(torch.equal(x.flatten(), y.float()) for x, y in shuffled)  # x and y stay paired
    again = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(ys, again)
    dropped = list(iterate_batches(split, 4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in dropped] == [4, 4]
    with pytest.raises(UsageError):
        next(iterate_batches(split, 0, shuffle=False))


def test_split_to_keeps_contents():
    split = Split(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))
    moved = split.to("cpu")
    assert len(moved) == 3 and torch.equal(moved.x, split.x) and torch.equal(moved.y, split.y)


def test_bad_png_bytes_are_a_usage_error(tmp_path):
    (tmp_path / "a").mkdir()
    bad = tmp_path / "a" / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(UsageError, match=str(bad)):
        load_dataset(f"folder:{tmp_path}")


def test_npy_out_of_range_is_a_usage_error(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "x.npy", np.full((4, 4), 3.0, np.float32))
    with pytest.raises(UsageError, match="x.npy"):
        load_dataset(f"folder:{tmp_path}")


def test_png_helper_is_a_valid_png_for_pillow_when_installed():
    pil = pytest.importorskip("PIL.Image", reason="Pillow is optional; the fallback decoder is tested above")
    img = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    with pil.open(io.BytesIO(_png(img, [0, 1, 2, 3, 4]))) as im:
        assert np.array_equal(np.asarray(im), img)
