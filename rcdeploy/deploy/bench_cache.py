"""The chunk cache of `rcdeploy bench`: finished attack chunks on disk, so an interrupted bench resumes.

Bench crafts and scores each attack chunk by chunk (`rcdeploy.deploy.evaluation`); each chunk's per-image
results (predictions per draw, twin agreement, perturbation, queries, crafting time) are one `.npz`
file, written atomically (a temp file, then a rename), so a bench stopped at any point, by Ctrl-C,
SIGTERM or a kill, leaves only whole chunk files. A rerun reads the chunks it finds and computes the
others.

The files live in `<cache dir>/<key>/`, where the key hashes everything a chunk's results depend on:
the model file (sha256), the scored images themselves, eps, every attack's settings (name, step,
steps, restarts, eot, seed, gradient source), the evaluation draws, the seed, isa, runtime, target,
the chunk size, the versions of torch, onnxruntime and numpy, and the source of the rcdeploy modules
that craft and score (attacks, twin, runtime, bench). A rerun with any of them changed uses another
folder and never reads the old chunks. Thread counts and `--nproc` are not in the key: a chunk's results
do not depend on which rank, or how many, computed it, so a bench interrupted at `--nproc 4` resumes at
`--nproc 1`.

The default cache dir is `<model file>.bench-cache/` beside the model; it is kept after a complete run
(a rerun with the same settings reads every chunk back and only scores latency again); delete the
folder to free the space.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rcdeploy.io import atomic_write_bytes, atomic_write_text, reason

KEY_VERSION = 1
SUFFIX = ".bench-cache"
#: The rcdeploy sources whose code decides a chunk's results (crafting and scoring); an edit to any of
#: them changes the key, so a cache never outlives the code that wrote it.
_CODE = ("attacks", "deploy/twin", "deploy/bench.py", "deploy/bench_inputs.py", "deploy/scoring.py",
         "deploy/evaluation.py", "deploy/bench_cache.py", "robustness.py", "runtime")


def default_dir(model: Path) -> Path:
    """`model.onnx` -> `model.onnx.bench-cache/` beside it."""
    return model.with_name(model.name + SUFFIX)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the rcdeploy sources that craft and score (see `_CODE`)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for part in _CODE:
        p = root / part
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def array_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The folder name for `fields` (everything per-image results depend on), and the fields as written."""
    import onnxruntime as ort
    import torch

    full = {"key_version": KEY_VERSION, **fields, "code_sha256": code_fingerprint(),
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}}
    text = json.dumps(full, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], full


class ChunkCache:
    """The chunk files of one key's folder; `folder` None is no cache (nothing read or written).

    A file that cannot be read back whole, or has other shapes than the chunk's, counts as missing (the
    chunk is computed again and the file replaced). A write that fails (disk full) turns the cache off
    for the rest of the run with a note: the bench itself goes on.
    """

    def __init__(self, folder: Path | None, fields: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.fields = fields
        self.failure: str | None = None
        self._described = False

    @property
    def enabled(self) -> bool:
        return self.folder is not None and self.failure is None

    @staticmethod
    def name(attack_index: int, attack_name: str, chunk: int) -> str:
        """`clean-00003.npz` for the clean chunks (attack_index -1), `01-pgd20-00003.npz` for an attack's."""
        if attack_index < 0:
            return f"clean-{chunk:05d}.npz"
        safe = "".join(ch if ch.isalnum() or ch in "-_@." else "_" for ch in attack_name)
        return f"{attack_index:02d}-{safe}-{chunk:05d}.npz"

    def load(self, name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The chunk's arrays when its file is there and has exactly `shapes` (extra keys allowed), else None."""
        if self.folder is None:
            return None
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError):
            return None
        if any(k not in data or data[k].shape != shape for k, shape in shapes.items()):
            return None
        return data

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        assert self.folder is not None
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            if not self._described and self.fields is not None:
                atomic_write_text(self.folder / "key.json", json.dumps(self.fields, indent=1, sort_keys=True,
                                                                       default=str) + "\n")
                self._described = True
            atomic_write_bytes(self.folder / name, buf.getvalue())
        except OSError as e:
            self.failure = f"{self.folder}: {reason(e)}"

    def files(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(f for f in os.listdir(self.folder) if f.endswith(".npz"))
