"""The official files of the standard datasets: mirrors, published MD5 sums, download and extraction."""

from __future__ import annotations

import hashlib
import logging
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rcdeploy.data.core import _one_line, _reading
from rcdeploy.errors import UsageError

log = logging.getLogger(__name__)


DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: a dead network fails in seconds, a slow one still works


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
