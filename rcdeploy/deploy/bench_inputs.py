"""Bench sections 1 and 2: what is benched, checked and resolved before any work.

`resolve_settings` checks every option and reads the model, its sidecar card and the CPU into
`BenchSettings` (cheap: no data loaded); `load_images` picks the fixed test subset and the eps into
`BenchImages`. Every later step (scoring, evaluation, size, latency, the report) takes these two.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from rcdeploy import validate as V
from rcdeploy.artifacts.model_card import ModelCard
from rcdeploy.deploy.bench_cache import default_dir
from rcdeploy.distributed import World
from rcdeploy.errors import UsageError
from rcdeploy.io import file_sha256
from rcdeploy.units import parse_fraction

DEFAULT_SAMPLES = 1000  # test images used when --samples is not given (all of them if fewer)
SUBSET_SEED = 0  # fixed, never --seed: the same images are scored in every run, for every model
CHUNK_IMAGES = 128  # images per chunk: the unit of sharding, seeding and the resume cache (never depends on --nproc)
CHUNK_ENV = "RCDEPLOY_BENCH_CHUNK"  # overrides CHUNK_IMAGES (tests use small chunks); part of the cache key
_UNIT_STRIDE = 1_000_000  # chunk_seed's number of (attack a, chunk c): (a + 1) * stride + c; clean is a = -1
MAX_LATENCY_BATCH = 4096  # images per timed batch: more measures memory bandwidth, and can exhaust it
MAX_SEED = 2**32 - 1


# ----------------------------------------------------------------------------------------- inputs


def read_sidecar(model_path: str | Path) -> tuple[ModelCard | None, str | None]:
    """The model card next to `model_path` (model.json for model.onnx) and a note when it was set aside.

    A missing card is normal (foreign models); one that is not JSON, or names no dataset, is set aside
    with a note rather than failing, since `--dataset` can stand in for it. One that names a dataset is
    a model card, and its fields must have the right types (a UsageError names the field).
    """
    p = ModelCard.path_for(model_path)
    if not p.is_file():
        return None, None
    try:
        raw = json.loads(V.read_text_file(p, "sidecar"))
    except (RecursionError, json.JSONDecodeError) as e:
        return None, f"sidecar {p} ignored: not readable JSON ({V.clip(str(e)) or type(e).__name__})"
    if not isinstance(raw, dict) or not isinstance(raw.get("dataset"), dict) or "name" not in raw["dataset"]:
        return None, f"sidecar {p} ignored: it names no dataset (not an rcdeploy model card)"
    return ModelCard.from_dict(raw, f"sidecar {p}", p), None


def parse_batch_sizes(spec: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """'1,64' -> [1, 64]; every size an integer >= 1, duplicates dropped, order kept."""
    items = [spec] if isinstance(spec, int) else (spec.split(",") if isinstance(spec, str) else list(spec))
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            b = int(text)
        except ValueError:
            raise UsageError(f"--batch-sizes {spec!r}: {text!r} is not an integer; write e.g. 1,64") from None
        if not 1 <= b <= MAX_LATENCY_BATCH:
            raise UsageError(f"--batch-sizes {V.shown(spec)}: batch sizes must be >= 1 and <= {MAX_LATENCY_BATCH}")
        if b not in out:
            out.append(b)
    if not out:
        raise UsageError(f"--batch-sizes {spec!r} names no batch size; write e.g. 1,64")
    return out


def _fraction(value: float | str | None, what: str) -> float | None:
    if value is None:
        return None
    return parse_fraction(value, what)


def _image_input(proto: onnx.ModelProto, path: str) -> tuple[str, list[int | str | None]]:
    """The graph's one float [N, C, H, W] input; anything else is a UsageError."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{path}: bench needs a model with one image input, this one has {len(inputs)} "
                         f"({', '.join(v.name for v in inputs) or 'none'})")
    vi = inputs[0]
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or tt.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(tt.elem_type).lower() if vi.type.HasField("tensor_type") else "non-tensor"
        raise UsageError(f"{path}: input {vi.name!r} is {kind}; bench needs float32 images [N, C, H, W] in [0, 1]")
    dims: list[int | str | None] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
    ]
    if not tt.HasField("shape") or len(dims) != 4:
        raise UsageError(f"{path}: input {vi.name!r} has shape {dims if tt.HasField('shape') else 'unknown'}, "
                         "not an image batch [N, C, H, W]")
    return vi.name, dims


def _subset(n: int, samples: int) -> np.ndarray:
    """Indices of `samples` test images: all of them, or a fixed random subset (classes mixed)."""
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:samples])


# ------------------------------------------------------------------------------------- 1. settings


@dataclass
class BenchSettings:
    """Every bench setting, checked and resolved once (before any data is loaded)."""

    path: Path
    proto: onnx.ModelProto
    input_name: str
    dims: list[int | str | None]
    card: ModelCard | None
    profile: Any  # rcdeploy.runtime.session.TargetProfile
    isa: str
    cpu: Any  # rcdeploy.runtime.cpu.CpuKind of this machine
    runtime: str
    batch_sizes: list[int]
    attack_spec: str  # "none" when no attack runs
    eps_flag: float | None
    step: float | None
    dataset: str | None
    data_dir: str | Path | None
    samples: int | None
    indices: tuple[int, ...] | None  # test-split indices scored in place of the `samples` subset
    restarts: int
    eot: int
    seed: int
    threads: int | None
    latency: bool
    latency_seconds: float
    progress: bool | Any
    cache_dir: Path | None = None  # where finished chunks are kept (None: no cache)
    chunk: int = CHUNK_IMAGES
    world: World = field(default_factory=World)
    notes: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)
    _sha256: str | None = None

    def model_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def emulated(self) -> bool:
        """Whether --isa names another kind of integer kernels than this CPU's (the twin scores then)."""
        return self.isa != self.cpu.isa

    @property
    def no_attacks(self) -> bool:
        return self.attack_spec.lower() in ("", "none")


def resolve_settings(model: str | Path, world: World | None = None, **kw: Any) -> BenchSettings:
    """Check every option (cheap, before any data is loaded) and resolve the model, its card and the CPU."""
    from rcdeploy.runtime.cpu import cpu_kind, resolve_isa
    from rcdeploy.runtime.session import check_runtime, get_target, load_model_proto

    path = Path(model)
    profile = get_target(kw["target"])
    isa_v, here = resolve_isa(kw["isa"]), cpu_kind()
    runtime = check_runtime(kw["runtime"])
    if isa_v != here.isa and runtime != "onnxruntime":
        raise UsageError(f"--isa {isa_v} emulates onnxruntime's integer kernels; with --runtime {runtime} bench scores "
                         f"on this CPU only (here {here.isa}): drop --isa or use --runtime onnxruntime")
    proto = load_model_proto(path)  # not a file / not ONNX: UsageError
    input_name, dims = _image_input(proto, str(path))
    card, sidecar_note = read_sidecar(path)
    batch_sizes = kw["batch_sizes"]
    sizes = parse_batch_sizes(batch_sizes if batch_sizes is not None else ("1" if kw["target"] == "mobile" else "1,64"))
    _check_numbers(kw)
    spec = str(kw["attacks"] or "none").strip()
    if spec.lower() not in ("", "none"):  # unknown names fail before any data is loaded
        from rcdeploy.attacks import parse_attacks

        parse_attacks(spec, eps=0.5)
    eps_flag, step_v = _checked_eps_step(kw["eps"], kw["step"])
    if card is not None and card.input_range is not None and card.input_range not in ([0, 1], [0.0, 1.0]):
        raise UsageError(f"{card.path}: input range {card.input_range} is not [0, 1]; bench attacks images in [0, 1]")
    world = world or World()
    notes = [sidecar_note] if sidecar_note else []
    cache_dir = _cache_dir(path, kw.get("cache", True), kw.get("cache_dir"), notes)
    return BenchSettings(
        path=path, proto=proto, input_name=input_name, dims=dims, card=card, profile=profile, isa=isa_v, cpu=here,
        runtime=runtime, batch_sizes=sizes, attack_spec=spec, eps_flag=eps_flag, step=step_v, dataset=kw["dataset"],
        data_dir=kw["data_dir"], samples=kw["samples"], indices=_checked_indices(kw), restarts=kw["restarts"], eot=kw["eot"], seed=kw["seed"],
        threads=kw["threads"], latency=kw["latency"], latency_seconds=kw["latency_seconds"],
        progress=kw["progress"] if world.main else False, cache_dir=cache_dir, chunk=_chunk_images(), world=world,
        notes=notes)


def _cache_dir(path: Path, cache: bool, cache_dir: str | Path | None, notes: list[str]) -> Path | None:
    """The chunk cache's folder: the one given (checked writable now), else `<model>.bench-cache` beside
    the model when that can be written (else none, with a note); None with cache off."""
    from rcdeploy.io import check_folder_writable

    if not cache:
        if cache_dir is not None:
            raise UsageError("--cache-dir and --no-cache contradict each other; pass one")
        return None
    if cache_dir is not None:
        return check_folder_writable(cache_dir, "--cache-dir")
    folder = default_dir(path)
    where = folder if folder.exists() else folder.parent
    if not os.access(where, os.W_OK | os.X_OK):
        notes.append(f"no bench cache: {where} is not writable (pass --cache-dir to make the bench resumable)")
        return None
    return folder


def _chunk_images() -> int:
    text = os.environ.get(CHUNK_ENV)
    if text is None:
        return CHUNK_IMAGES
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= _UNIT_STRIDE - 1:
        raise UsageError(f"{CHUNK_ENV}={text!r}: images per chunk must be an integer >= 1")
    return n


def _check_numbers(kw: dict[str, Any]) -> None:
    samples, restarts, eot, threads = kw["samples"], kw["restarts"], kw["eot"], kw["threads"]
    if samples is not None and int(samples) < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if restarts < 1 or eot < 1:
        raise UsageError(f"--restarts and --eot must be >= 1, got {restarts} and {eot}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if not 0 <= int(kw["seed"]) <= MAX_SEED:
        raise UsageError(f"--seed must be >= 0 and <= {MAX_SEED}, got {kw['seed']}")
    seconds = kw["latency_seconds"]
    if not (math.isfinite(seconds) and 0 < seconds <= 3600):
        raise UsageError(f"--latency-seconds must be a finite number in (0, 3600], got {seconds}")


def _checked_indices(kw: dict[str, Any]) -> tuple[int, ...] | None:
    """`indices` (Python API): distinct test-split indices, not with `samples` (their range is checked once the
    split is loaded)."""
    given = kw.get("indices")
    if given is None:
        return None
    if kw["samples"] is not None:
        raise UsageError("indices and samples both choose the test images; pass one")
    idx = tuple(int(i) for i in given)
    if not idx or min(idx) < 0 or len(set(idx)) != len(idx):
        raise UsageError("indices must be distinct test-split indices >= 0, at least one")
    return idx


def _checked_eps_step(eps: float | str | None, step: float | str | None) -> tuple[float | None, float | None]:
    eps_flag, step_v = _fraction(eps, "eps"), _fraction(step, "step")
    if eps_flag is not None and not 0 < eps_flag <= 1:
        raise UsageError(f"--eps {eps_flag:g} is outside (0, 1]: eps is in [0, 1] image units, e.g. 8/255")
    if step_v is not None and not 0 < step_v <= 1:
        raise UsageError(f"--step {step_v:g} is outside (0, 1]: step is in [0, 1] image units, e.g. 2/255")
    return eps_flag, step_v


# --------------------------------------------------------------------------------------- 2. images


@dataclass
class BenchImages:
    """The scored test images, the dataset they come from, and the eps they are attacked at."""

    meta: Any  # rcdeploy.data.DatasetMeta
    x: Any  # torch.Tensor [n, C, H, W] in [0, 1]
    y: Any  # torch.Tensor [n]
    n_total: int
    data_dir: str | Path | None
    index: Any = None  # np.ndarray [n]: the images' indices in the test split
    eps: float = 0.0
    eps_source: str = ""

    @property
    def n(self) -> int:
        return len(self.x)


def load_images(s: BenchSettings) -> BenchImages:
    """The dataset (the flag's, else the card's), the fixed test subset, and the eps to attack at."""
    from rcdeploy.data import load_dataset

    card = s.card
    name = s.dataset or (card.dataset_name if card else None)
    if not name:
        raise UsageError(f"{s.path}: no sidecar {s.path.with_suffix('.json').name} names the dataset; "
                         "pass --dataset NAME")
    overridden = bool(s.dataset and card and s.dataset != card.dataset_name)
    if overridden:
        s.notes.append(f"--dataset {s.dataset} overrides the sidecar's {card.dataset_name}")
    from_card = card is not None and not overridden  # the card's eps and data_dir belong to its dataset
    data_dir = s.data_dir if s.data_dir is not None or not (from_card and card.data_dir) else card.data_dir
    data = load_dataset(name, data_dir)  # unknown dataset / missing files: UsageError
    images = _test_subset(s, data, data_dir)
    images.eps, images.eps_source = _resolve_eps(s, images.meta, from_card)
    return images


def _test_subset(s: BenchSettings, data: Any, data_dir: str | Path | None) -> BenchImages:
    meta = data.meta
    spatial = s.dims[1:]
    if any(isinstance(d, int) and d > 0 and d != m for d, m in zip(spatial, meta.shape)):
        raise UsageError(f"{s.path}: input {s.input_name!r} takes images {spatial}, dataset {meta.name!r} has "
                         f"{list(meta.shape)}; pass the --dataset the model was trained on")
    n_total = len(data.test)
    if n_total == 0:
        raise UsageError(f"dataset {meta.name!r} has no test images")
    if s.indices is not None:
        if max(s.indices) >= n_total:
            raise UsageError(f"indices: {max(s.indices)} is past the {meta.name} test split ({n_total} images)")
        idx = np.array(sorted(s.indices))
    else:
        n = min(int(s.samples) if s.samples is not None else DEFAULT_SAMPLES, n_total)
        if s.samples is not None and int(s.samples) > n_total:
            s.notes.append(f"--samples {s.samples}: the {meta.name} test split has {n_total} images, all used")
        idx = _subset(n_total, n)
    return BenchImages(meta=meta, x=data.test.x[idx].cpu().float().contiguous(), y=data.test.y[idx].cpu().long(),
                       n_total=n_total, data_dir=data_dir, index=idx)


def _resolve_eps(s: BenchSettings, meta: Any, from_card: bool) -> tuple[float, str]:
    """--eps, else the card's training eps, else the dataset's literature default."""
    card_eps = s.card.training_eps if s.card is not None else None
    if s.eps_flag is not None:
        eps_v, source = s.eps_flag, "--eps"
    elif card_eps is not None and from_card:
        try:
            eps_v, source = _fraction(card_eps, "eps"), "sidecar training eps"
        except UsageError:
            raise UsageError(f"sidecar {s.card.path}: training.eps: {V.shown(card_eps)} is not a number or "
                             "fraction like 8/255; fix it, or pass --eps") from None
    else:
        eps_v, source = float(meta.default_eps), f"dataset {meta.name} default"
    if not 0 < eps_v <= 1:
        raise UsageError(f"eps {eps_v:g} ({source}) is outside (0, 1]; pass --eps in [0, 1] image units, e.g. 8/255")
    return eps_v, source
