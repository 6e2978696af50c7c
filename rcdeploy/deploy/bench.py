"""`rcdeploy bench`: latency, size, clean and robust accuracy of the ONNX file that ships.

Reads nothing but the ONNX file and, when present, its sidecar (`model.json` next to
`model.onnx`), so it benches any ONNX image classifier with one float [N, C, H, W] input in
[0, 1] (normalization inside the graph), given `dataset`.

Robust accuracy is measured on the deployed artifact (DESIGN.md): white-box attacks take their
gradients from the differentiable twin (`rcdeploy.deploy.twin`), rebuilt from the graph itself
with straight-through rounding; every adversarial image is then scored by onnxruntime on the
real file, and the twin's top-1 agreement with onnxruntime is reported on clean and adversarial
images. Square runs against onnxruntime directly, with no gradients, as the check against
gradient masking. Per sample, the worst case over clean and every attack run is kept
(AutoAttack's robust accuracy).

Stochastic graphs (RandomNormalLike / RandomUniformLike): attacks average `eot` gradient (or
logit) draws, and every accuracy is the mean over `eot` onnxruntime evaluations.

Sharded and resumable: clean scoring and every attack run chunk by chunk (CHUNK_IMAGES images, the
same whatever `nproc` is), each chunk from its own seed, so a chunk's per-image results do not depend on
which process computed it or what ran before it. With `nproc` ranks each takes every nproc-th chunk; the
per-image results are merged exactly, then every figure is computed as in one process. Finished chunks
are kept in a cache folder (`rcdeploy.deploy.bench_cache`) and skipped on a rerun. Latency is measured by
rank 0 alone, after every rank's attacks.

The report is one JSON-able dict: keys carry their unit (`_ms`, `_s`, `_bytes`, `_pct`,
`_per_s`), and `settings` holds everything the figures depend on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from rcdeploy import validate as V
from rcdeploy.artifacts.model_card import ModelCard
from rcdeploy.deploy.bench_cache import ChunkCache, array_sha256, cache_key, default_dir
from rcdeploy.distributed import World, job_size
from rcdeploy.errors import UsageError
from rcdeploy.robustness import EPS_SLACK, WorstCase, chunk_seed, chunks, craft, owned
from rcdeploy.units import parse_fraction

__all__ = [
    "ATTACK_BATCH",
    "CHUNK_IMAGES",
    "DEFAULT_SAMPLES",
    "REPORT_FORMAT",
    "bench_model",
    "first_broken_by",
    "gradient_masking_flags",
    "parse_batch_sizes",
    "read_sidecar",
]

REPORT_FORMAT = "rcdeploy-bench"
REPORT_VERSION = 1
DEFAULT_SAMPLES = 1000  # test images used when --samples is not given (all of them if fewer)
SUBSET_SEED = 0  # fixed, never --seed: the same images are scored in every run, for every model
ATTACK_BATCH = 256  # images per attack call (twin autograd memory stays small at CIFAR size)
CHUNK_IMAGES = 128  # images per chunk: the unit of sharding, seeding and the resume cache (never depends on --nproc)
CHUNK_ENV = "RCDEPLOY_BENCH_CHUNK"  # overrides CHUNK_IMAGES (tests use small chunks); part of the cache key
_UNIT_STRIDE = 1_000_000  # chunk_seed's number of (attack a, chunk c): (a + 1) * stride + c; clean is a = -1
EVAL_BATCH = 256  # images per onnxruntime call when scoring
TINY_PIXELS = 32 * 32  # C*H*W at or below this: torch and the scoring session use 1 thread by default
MIN_AGREEMENT_PCT = 99.0  # twin vs onnxruntime top-1 below this: white-box figures are suspect
MAX_LATENCY_BATCH = 4096  # images per timed batch: more measures memory bandwidth, and can exhaust it
MAX_SEED = 2**32 - 1
_STOCHASTIC_OPS = {"RandomNormalLike", "RandomUniformLike", "RandomNormal", "RandomUniform", "Multinomial"}


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


def _is_stochastic(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in _STOCHASTIC_OPS for n in proto.graph.node)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _subset(n: int, samples: int) -> np.ndarray:
    """Indices of `samples` test images: all of them, or a fixed random subset (classes mixed)."""
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:samples])


# ------------------------------------------------------------------------------------------ scoring


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(previous)


def _ort_preds(session: Any, x: np.ndarray, draws: int) -> tuple[np.ndarray, int]:
    """Top-1 predictions [draws, N] of onnxruntime, and the number of logits per image."""
    from rcdeploy.runtime.session import run_logits

    preds, classes = [], 0
    for _ in range(draws):
        try:
            logits = run_logits(session, x, batch_size=EVAL_BATCH)
        except _runtime_errors() as e:  # the graph rejects these images (shapes it cannot take)
            raise UsageError(f"the runtime cannot run the model on images {list(x.shape[1:])} "
                             f"({V.clip(str(e), 120)}); pass the --dataset the model was trained on") from None
        if logits.ndim != 2:
            raise UsageError(f"the model's first output has shape {list(logits.shape)}; bench needs logits [N, classes]")
        if not np.isfinite(logits).all():
            raise UsageError("onnxruntime returned non-finite logits for test images; the model is broken")
        classes = logits.shape[1]
        preds.append(logits.argmax(1))
    return np.stack(preds), classes


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """What a runtime raises when a graph cannot run on given inputs (onnxruntime's are not RuntimeErrors)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (RuntimeError, ValueError, state.Fail, state.InvalidArgument, state.RuntimeException)


def _twin_preds(twin: Any, x: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([twin(x[i : i + EVAL_BATCH]).argmax(1) for i in range(0, len(x), EVAL_BATCH)]).numpy()


def _pct(v: float) -> float:
    return 100.0 * float(v)


def _noise_pct(acc_pct: float, n: int) -> float:
    """Two binomial standard errors of an accuracy over n images, at least one image (in %)."""
    p = min(max(acc_pct / 100.0, 0.0), 1.0)
    return max(100.0 / n, 200.0 * math.sqrt(p * (1 - p) / n))


_ONE_STEP = ("fgsm",)
_ITERATIVE = ("ifgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t")


def _source(row: dict[str, Any]) -> str:
    """A report row's gradient source: "queries" (black box), "ste" or "smooth" (older rows: by family)."""
    return row.get("gradient_source") or ("queries" if row["family"] == "square" else "ste")


def gradient_masking_flags(robust: list[dict[str, Any]], samples: int) -> list[str]:
    """Warnings of likely gradient masking from per-attack results (`family`, `name`, `robust_acc_pct`,
    optionally `gradient_source`).

    - a black-box attack (square) or an attack on the smooth surrogate (`@smooth`) beats every
      straight-through white-box attack by more than noise: the straight-through gradients are masked;
    - a one-step attack (fgsm) beats an iterative one by more than noise.
    Noise is two binomial standard errors (at least one image) of the better straight-through figure.
    """
    flags: list[str] = []
    white = [r for r in robust if _source(r) == "ste" and r["family"] in _ONE_STEP + _ITERATIVE]
    others = [r for r in robust if _source(r) in ("queries", "smooth")]
    if white:
        best_white = min(white, key=lambda r: r["robust_acc_pct"])
        tol = _noise_pct(best_white["robust_acc_pct"], samples)
        for r in others:
            gap = best_white["robust_acc_pct"] - r["robust_acc_pct"]
            if gap > tol:
                kind = "black-box" if _source(r) == "queries" else "smooth-surrogate"
                flags.append(f"likely gradient masking: {kind} {r['name']} ({r['robust_acc_pct']:.1f}%) beats the "
                             f"best straight-through attack {best_white['name']} ({best_white['robust_acc_pct']:.1f}%)"
                             f" by {gap:.1f} points (noise {tol:.1f})")
    for one in (r for r in robust if r["family"] in _ONE_STEP):
        for it in (r for r in robust if r["family"] in _ITERATIVE and _source(r) == _source(one)):
            gap = it["robust_acc_pct"] - one["robust_acc_pct"]
            tol = _noise_pct(it["robust_acc_pct"], samples)
            if gap > tol:
                flags.append(f"likely gradient masking: one-step {one['name']} ({one['robust_acc_pct']:.1f}%) beats "
                             f"iterative {it['name']} ({it['robust_acc_pct']:.1f}%) by {gap:.1f} points "
                             f"(noise {tol:.1f})")
    return flags


def first_broken_by(worst: WorstCase) -> dict[str, Any]:
    """Per image, the first of clean and the attacks (in run order) that reached its worst score.

    `first`: images credited to each name ("clean": already wrong without an attack; "robust": no attack
    lowered the score); `only`: images no other attack brought as low (what dropping that attack would
    lose). With noise draws a score is a fraction and "reached" means equal to the image's minimum.
    """
    scores = np.stack(worst.scores)  # [1 + attacks, N]
    low = scores.min(0)
    first_idx = (scores == low[None]).argmax(0)
    hurt = low < 1.0
    names = worst.names
    first = {name: int(((first_idx == i) & hurt).sum()) for i, name in enumerate(names)}
    first["robust"] = int((~hurt).sum())
    reached = scores[1:] == low[None]
    unique = reached.sum(0) == 1
    only = {name: int((reached[i] & unique & hurt & (scores[0] > low)).sum()) for i, name in enumerate(names[1:])}
    return {"order": names, "first": first, "only": only, "images": int(scores.shape[1])}


class _ProgressSink:
    """A rich progress bar on stderr (or nothing): one task per attack (in images) and one for latency."""

    def __init__(self, enabled: bool | Any) -> None:
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = enabled if not isinstance(enabled, bool) else Console(stderr=True)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False)

    def __enter__(self) -> _ProgressSink:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            if exc[0] is not None:  # a failure is one error line: no half-done bars left above it
                for tid in self._progress.task_ids:
                    self._progress.update(tid, visible=False)
            self._progress.stop()

    def task(self, description: str, total: int, unit: str = "img") -> Callable[..., None]:
        """A callback `update(advance=0, description=None)` for one task."""
        if self._progress is None:
            return lambda advance=0, description=None: None
        tid = self._progress.add_task(description, total=total, unit=unit)

        def update(advance: int = 0, description: str | None = None) -> None:
            self._progress.update(tid, advance=advance, **({"description": description} if description else {}))

        return update


# ------------------------------------------------------------------------------------------- bench


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
            self._sha256 = _sha256(self.path)
        return self._sha256

    @property
    def emulated(self) -> bool:
        """Whether --isa names another kind of integer kernels than this CPU's (the twin scores then)."""
        return self.isa != self.cpu.isa

    @property
    def no_attacks(self) -> bool:
        return self.attack_spec.lower() in ("", "none")


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


def bench_model(
    model: str | Path,
    *,
    attacks: str = "ifgsm20",
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    samples: int | None = None,
    eps: float | str | None = None,
    step: float | str | None = None,
    restarts: int = 1,
    eot: int = 1,
    target: str = "cpu",
    batch_sizes: str | list[int] | None = None,
    seed: int = 0,
    threads: int | None = None,
    latency: bool = True,
    latency_seconds: float = 1.0,
    progress: bool | Any = True,
    isa: str | None = None,
    runtime: str = "onnxruntime",
    nproc: int = 1,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any] | None:
    """Bench the ONNX file `model`; returns the report (JSON-able, units in the key names).

    attacks: comma list (`fgsm`, `ifgsmN`, `pgdN`, `cwN`, `squareN`) or 'none'.
    dataset / data_dir / eps: default to the sidecar's (eps: its training eps, else the
    dataset's default_eps); step defaults to the attacks' own (eps / 4).
    samples: test images scored (default min(DEFAULT_SAMPLES, test split)).
    eot: gradient and evaluation draws for stochastic graphs (ignored for deterministic ones).
    target: 'cpu' or 'mobile' latency profile; batch_sizes default to 1,64 on cpu and 1 on
        mobile, which measures batch 1 only.
    threads: torch threads for the twin and onnxruntime threads for scoring (default 1 for
        inputs of at most TINY_PIXELS values, else the libraries' defaults); latency always
        uses the target profile's threads.
    latency: measure latency (in a child process, `latency_seconds` per batch size at least).
    progress: True for a rich progress bar on stderr, a rich Console to draw it on, or False.
    isa: what the integer kernels compute: 'exact' or 'avx2' (x86 without VNNI: u8 x s8 pair sums
        saturate at int16); default what this CPU does. When it is not what this CPU does, the twin
        emulates it and scores every image in place of onnxruntime (the report says so).
    runtime: 'onnxruntime' or 'openvino' (optional extra): the runtime that scores the images and is
        timed; the twin, the attacks' gradients and the static checks stay onnxruntime's graph semantics.
    nproc: worker processes the clean and attack chunks are shared over (spawned here, joined with gloo);
        every split gives the same per-image results as one process. Each takes max(1, cores // nproc)
        torch threads unless `threads`. Under torchrun (WORLD_SIZE > 1) this process runs as its rank
        instead and `nproc` is ignored; ranks other than 0 return None.
    cache / cache_dir: keep each finished chunk in `cache_dir` (default `<model file>.bench-cache/`
        beside the model; see rcdeploy.deploy.bench_cache) and skip the chunks found there on a rerun
        with the same model, images and settings, so an interrupted bench resumes. Kept after a complete
        run (a rerun reads every chunk back); `cache=False` reads and writes nothing.
    """
    kw: dict[str, Any] = dict(attacks=attacks, dataset=dataset, data_dir=data_dir, samples=samples, eps=eps,
                              step=step, restarts=restarts, eot=eot, target=target, batch_sizes=batch_sizes,
                              seed=seed, threads=threads, latency=latency, latency_seconds=latency_seconds,
                              progress=progress, isa=isa, runtime=runtime, cache=cache, cache_dir=cache_dir)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"--nproc must be an integer >= 1, got {nproc!r}")
    if nproc > 1 and job_size() == 1:
        resolve_settings(model, **kw)  # bad input fails here, in a second, before any worker starts
        return _launch_bench(nproc, model, kw)
    world = World.from_env()
    s = resolve_settings(model, world=world, **kw)
    images = load_images(s)
    scorer = Scorer.open(s, images)
    accuracy = evaluate(s, images, scorer)
    # Every rank's chunks are done (the merge was a collective); the others leave now, so rank 0 measures
    # size and latency on a machine nothing else of this bench loads (a rank waiting in a barrier instead
    # could time out during a long latency run and take rank 0's report down with it).
    world.barrier()
    if not world.main:
        return None
    graph, size = measure_size(s, accuracy["flags"])
    lat, errors = measure_latency(s, graph, size)
    return build_report(s, images, scorer, accuracy, size, lat, errors)


def _launch_bench(nproc: int, model: str | Path, kw: dict[str, Any]) -> dict[str, Any] | None:
    """`nproc` local ranks of `bench_model`; rank 0's report. A SIGTERM / Ctrl-C here stops the workers
    (torch's elastic agent forwards it; `launch` puts the signal handlers back) and is a KeyboardInterrupt,
    as in one process."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from rcdeploy.distributed import launch

    kw = {**kw, "progress": bool(kw["progress"])}  # a Console does not cross processes; rank 0 draws its own
    try:
        return launch(nproc, _bench_rank, str(model), kw)
    except SignalException:
        raise KeyboardInterrupt from None


def _bench_rank(model: str, kw: dict[str, Any]) -> dict[str, Any] | None:
    """One launched rank (module level: spawned workers unpickle it by name). SIGTERM, which the agent
    sends to stop the workers, unwinds like Ctrl-C, so a chunk being written leaves no temp file behind."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return bench_model(model, **kw)


# ------------------------------------------------------------------------------------- 1. settings


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
        data_dir=kw["data_dir"], samples=kw["samples"], restarts=kw["restarts"], eot=kw["eot"], seed=kw["seed"],
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


def _checked_eps_step(eps: float | str | None, step: float | str | None) -> tuple[float | None, float | None]:
    eps_flag, step_v = _fraction(eps, "eps"), _fraction(step, "step")
    if eps_flag is not None and not 0 < eps_flag <= 1:
        raise UsageError(f"--eps {eps_flag:g} is outside (0, 1]: eps is in [0, 1] image units, e.g. 8/255")
    if step_v is not None and not 0 < step_v <= 1:
        raise UsageError(f"--step {step_v:g} is outside (0, 1]: step is in [0, 1] image units, e.g. 2/255")
    return eps_flag, step_v


# --------------------------------------------------------------------------------------- 2. images


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


# --------------------------------------------------------------------------------------- 3. scorer


class Scorer:
    """What scores images: onnxruntime (or OpenVINO) on this CPU, or the twin emulating --isa; and the
    twin the white-box attacks take their gradients from (None when it cannot be built)."""

    def __init__(self, s: BenchSettings, session: Any, twin: Any, twin_error: UsageError | None,
                 twin_build_s: float, draws: int, work_threads: int | None) -> None:
        self.s, self.session, self.twin, self.twin_error = s, session, twin, twin_error
        self.twin_build_s, self.draws, self.work_threads = twin_build_s, draws, work_threads
        self.stochastic = _is_stochastic(s.proto)
        self.classes = 0  # logits per image, set when the clean images are scored
        self.clean_preds = np.empty((0, 0), dtype=np.int64)  # [draws, N] top-1 on clean images
        self.attack_list: list[Any] = []  # the attacks run, set by evaluate
        self._surrogate: Any = None  # the smooth surrogate, built when an `@smooth` attack first needs it

    @classmethod
    def open(cls, s: BenchSettings, images: BenchImages) -> Scorer:
        from rcdeploy.runtime.session import open_runtime_session

        stochastic = _is_stochastic(s.proto)
        draws = s.eot if stochastic else 1
        if s.eot > 1 and not stochastic:
            s.notes.append(f"--eot {s.eot} ignored: the graph has no random ops, one draw is exact")
        if stochastic and s.eot == 1:  # RobustBench's rule for randomized defenses: expectation over draws
            s.notes.append("the graph draws noise and --eot is 1: attacks step on one draw's gradient and every "
                           "accuracy is one draw; pass --eot N (e.g. 20) for EOT figures")
        if stochastic and s.runtime != "onnxruntime" and not s.emulated:
            s.notes.append(f"the graph draws noise and {s.runtime} takes no seed: its figures vary from run to run "
                           "(and with --nproc), and cached chunks keep the draws they were scored with")
        pixels = int(np.prod(images.x.shape[1:]))
        if s.threads is not None:
            work_threads = s.threads
        elif pixels <= TINY_PIXELS:
            work_threads = 1
        else:  # ranks share the cores
            work_threads = max(1, (os.cpu_count() or 1) // s.world.size) if s.world.distributed else None
        # Scoring uses every core whatever the target (mobile's one thread is a latency setting only).
        session = open_runtime_session(s.path, runtime=s.runtime, target=s.profile.name,
                                       threads=work_threads or os.cpu_count() or 1)
        twin, twin_error, build_s = _build_twin(s)
        return cls(s, session, twin, twin_error, build_s, draws, work_threads)

    def reseed(self, seed: int) -> None:
        """Before a chunk: a stochastic graph's onnxruntime noise restarts from `seed` (a new session takes
        onnxruntime's global seed), so the chunk's draws do not depend on the chunks scored before it."""
        if not (self.stochastic and self.s.runtime == "onnxruntime" and not self.s.emulated):
            return
        import onnxruntime as ort

        from rcdeploy.runtime.session import open_runtime_session

        ort.set_seed(seed)
        self.session = open_runtime_session(self.s.path, runtime=self.s.runtime, target=self.s.profile.name,
                                            threads=self.work_threads or os.cpu_count() or 1)

    def preds(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Top-1 predictions [draws, N]: onnxruntime on this CPU, or the twin emulating --isa."""
        import torch

        if not self.s.emulated:
            return _ort_preds(self.session, x, self.draws)
        with _torch_threads(self.work_threads), torch.no_grad():
            preds = [_twin_preds(self.twin, torch.from_numpy(x)) for _ in range(self.draws)]
        return np.stack(preds), int(self.twin(torch.from_numpy(x[:1])).shape[1])

    def runtime_preds(self, x: np.ndarray, scored: np.ndarray) -> np.ndarray:
        """The runtime's own predictions (one draw): `scored` unless the twin scored in its place."""
        return _ort_preds(self.session, x, self.draws)[0] if self.s.emulated else scored[0]

    def black_box(self, x: Any) -> Any:
        """The black-box model Square queries: what scores the images (onnxruntime, or the emulation)."""
        import torch

        if self.s.emulated:
            with torch.no_grad():
                return self.twin(x.detach())
        from rcdeploy.runtime.session import run_logits

        return torch.from_numpy(run_logits(self.session, x.detach().cpu().numpy(), batch_size=EVAL_BATCH))

    def gradient_model(self, atk: Any) -> Any:
        """The model an attack is handed: the runtime's outputs (black box), the straight-through twin,
        or the smooth surrogate of the same graph (`@smooth`)."""
        if atk.black_box:
            return self.black_box
        if atk.gradients != "smooth":
            return self.twin
        if self._surrogate is None:
            from rcdeploy.deploy.twin import build_twin

            self._surrogate = build_twin(self.s.proto, ste=True, noise=True, smooth=True)
        return self._surrogate

    def twin_agreement(self, x: Any, runtime_preds: np.ndarray) -> np.ndarray:
        return _twin_preds(self.twin, x) == runtime_preds


def _build_twin(s: BenchSettings) -> tuple[Any, UsageError | None, float]:
    try:
        from rcdeploy.deploy.twin import build_twin

        t = time.perf_counter()
        twin = build_twin(s.proto, ste=True, noise=True, isa=s.isa)
        build_s = time.perf_counter() - t
    except UsageError as e:
        twin, twin_error, build_s = None, e, 0.0
    else:
        twin_error = None
    if s.emulated and twin is None:
        raise UsageError(f"{s.path}: --isa {s.isa} differs from this CPU ({s.cpu.isa}) and needs the differentiable "
                         f"twin to emulate it, which cannot be built ({twin_error})")
    return twin, twin_error, build_s


# ---------------------------------------------------------------------------- 4-5. clean and attacks
#
# The work is cut into units: (clean or attack a, chunk c), a chunk being `s.chunk` consecutive images
# (CHUNK_IMAGES, whatever --nproc is). Before a unit, the attack's generator and torch's global RNG (the
# twin's noise ops draw from it) are seeded with chunk_seed(seed, (a + 1) * _UNIT_STRIDE + c), and a
# stochastic graph's onnxruntime session is reopened on that seed, so a unit's per-image results are a
# function of the unit alone: any split of the units over ranks, and any rerun of a unit, gives the same
# results. Rank r of N takes every N-th unit (`owned`), reads it from the chunk cache or computes and
# saves it; the per-image arrays are then summed over the ranks (each image's slot is filled by exactly
# one rank, the others add zeros, so the sum is exact), and every figure is computed from the merged arrays
# exactly as for one process.


@dataclass(frozen=True)
class _Unit:
    attack: int  # index into the attack list; -1: the clean images
    chunk: int
    part: slice

    @property
    def number(self) -> int:
        """The unit's number for chunk_seed: distinct for every (attack, chunk)."""
        return (self.attack + 1) * _UNIT_STRIDE + self.chunk

    @property
    def size(self) -> int:
        return self.part.stop - self.part.start


class _Results:
    """Per-image results of every unit in zero-filled float64 arrays (the layout the ranks sum)."""

    def __init__(self, n: int, draws: int, attacks: int, n_chunks: int, n_units: int) -> None:
        z = np.zeros
        self.arrays: dict[str, np.ndarray] = {
            "clean_preds": z((draws, n)), "clean_agree": z(n), "classes": z(n_chunks),
            "preds": z((attacks, draws, n)), "agree": z((attacks, n)), "pert": z((attacks, n)),
            "in_range": z((attacks, n)), "queries": z((attacks, n)), "time_s": z((attacks, n_chunks)),
            "computed": z(n_units), "cached": z(n_units), "cache_failures": z(1),
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def fill(self, unit: _Unit, data: dict[str, np.ndarray]) -> None:
        a, p, c = unit.attack, unit.part, unit.chunk
        if a < 0:
            self["clean_preds"][:, p] = data["preds"]
            self["classes"][c] = data["classes"]
            if "agree" in data:
                self["clean_agree"][p] = data["agree"]
            return
        self["preds"][a][:, p] = data["preds"]
        self["pert"][a, p] = data["pert"]
        self["in_range"][a, p] = data["in_range"]
        self["time_s"][a, c] = data["time_s"]
        for name in ("agree", "queries"):
            if name in data:
                self[name][a, p] = data[name]

    def merged(self, world: World) -> _Results:
        """The sum over ranks (in place; one all-reduce of every array packed together)."""
        if world.distributed:
            import torch

            names = list(self.arrays)
            flat = torch.from_numpy(np.concatenate([self.arrays[k].ravel() for k in names]))
            world.sum_(flat)
            out, at = flat.numpy(), 0
            for k in names:
                size = self.arrays[k].size
                self.arrays[k] = out[at : at + size].reshape(self.arrays[k].shape).copy()
                at += size
        return self


def evaluate(s: BenchSettings, images: BenchImages, scorer: Scorer) -> dict[str, Any]:
    """Clean and robust accuracy (the report's accuracy section), this rank's share of the chunks computed
    or read from the cache, merged exactly over the ranks; the per-image worst case, twin agreement, flags."""
    import torch

    from rcdeploy.attacks import parse_attacks

    attack_list = [] if s.no_attacks else parse_attacks(s.attack_spec, eps=images.eps, step=s.step,
                                                       restarts=s.restarts, eot=scorer.draws, seed=s.seed)
    scorer.attack_list = attack_list
    if scorer.twin is None and any(a.family != "square" for a in attack_list):
        raise UsageError(f"{s.path}: white-box attacks need the differentiable twin, which cannot be built "
                         f"({scorer.twin_error}); run squareN only") from None
    parts = chunks(images.n, s.chunk)
    units = [_Unit(a, c, p) for a in range(-1, len(attack_list)) for c, p in enumerate(parts)]
    cache = _open_cache(s, images, scorer, attack_list)
    local = _Results(images.n, scorer.draws, len(attack_list), len(parts), len(units))
    mine = owned(units, s.world.rank, s.world.size)
    seeds = [a.seed for a in attack_list]
    try:
        with _torch_threads(scorer.work_threads), torch.random.fork_rng(devices=[]), \
                _ProgressSink(s.progress) as sink:
            updates = _progress_tasks(s, sink, attack_list, [u for _, u in mine])
            for i, unit in mine:
                atk = attack_list[unit.attack] if unit.attack >= 0 else None
                name = cache.name(unit.attack, atk.name if atk is not None else "clean", unit.chunk)
                data = cache.load(name, _unit_shapes(unit, atk, scorer))
                if data is None:
                    data = _compute_unit(s, images, scorer, atk, unit)
                    cache.save(name, data)
                    local["computed"][i] = 1
                else:
                    local["cached"][i] = 1
                local.fill(unit, data)
                updates[unit.attack](advance=unit.size)
    finally:
        for atk, seed in zip(attack_list, seeds):
            atk.reseed(seed)  # the report's settings show the run's seed, not the last chunk's
    local["cache_failures"][0] = 1.0 if cache.failure else 0.0
    merged = local.merged(s.world)
    return _accuracy(s, images, scorer, merged, cache, len(units))


def _open_cache(s: BenchSettings, images: BenchImages, scorer: Scorer, attack_list: list[Any]) -> ChunkCache:
    """The chunk cache folder of these settings (no cache without attacks: clean scoring is one quick pass)."""
    if s.cache_dir is None or not attack_list:
        return ChunkCache(None)
    fields = {
        "model_sha256": s.model_sha256(), "images_sha256": array_sha256(images.x.numpy(), images.y.numpy()),
        "dataset": images.meta.name, "samples": images.n, "eps": images.eps,
        "attacks": [a.to_dict() for a in attack_list], "evaluation_draws": scorer.draws, "seed": s.seed,
        "isa": s.isa, "emulated": s.emulated, "runtime": s.runtime, "target": s.profile.name,
        "chunk_images": s.chunk, "twin": scorer.twin is not None,
    }
    key, described = cache_key(fields)
    return ChunkCache(s.cache_dir / key, described)


def _progress_tasks(s: BenchSettings, sink: _ProgressSink, attack_list: list[Any],
                    mine: list[_Unit]) -> dict[int, Callable[..., None]]:
    """One progress task per attack, over the images of this rank's chunks (clean scoring is quick: no bar)."""
    where = f", rank {s.world.rank} of {s.world.size}" if s.world.distributed else ""
    tasks: dict[int, Callable[..., None]] = {-1: lambda advance=0, description=None: None}
    for a in range(len(attack_list)):
        total = sum(u.size for u in mine if u.attack == a)
        atk = attack_list[a]
        source = "queries" if atk.black_box else atk.gradients
        tasks[a] = sink.task(f"{atk.name} ({_SOURCE_LABELS[source].format(runtime=s.runtime)}{where})", total)
    return tasks


def _unit_shapes(unit: _Unit, atk: Any, scorer: Scorer) -> dict[str, tuple[int, ...]]:
    """The arrays a unit's cache file must hold, with their shapes."""
    m = unit.size
    shapes: dict[str, tuple[int, ...]] = {"preds": (scorer.draws, m)}
    if scorer.twin is not None:
        shapes["agree"] = (m,)
    if atk is None:
        shapes["classes"] = ()
        return shapes
    shapes.update({"pert": (m,), "in_range": (m,), "time_s": ()})
    if hasattr(atk, "queries_used"):
        shapes["queries"] = (m,)
    return shapes


def _compute_unit(s: BenchSettings, images: BenchImages, scorer: Scorer, atk: Any,
                  unit: _Unit) -> dict[str, np.ndarray]:
    """One unit, from its own seed: the clean images scored, or an attack's images crafted and scored."""
    import torch

    seed = chunk_seed(s.seed, unit.number)
    torch.manual_seed(seed)
    scorer.reseed(seed)
    x, y = images.x[unit.part], images.y[unit.part]
    if atk is None:
        preds, classes = scorer.preds(x.numpy())
        _check_classes(s, images, classes)
        out = {"preds": preds.astype(np.int64), "classes": np.array(classes, dtype=np.int64)}
        scored = x
    else:
        atk.reseed(seed)
        made = craft(atk, scorer.gradient_model(atk), x, y, ATTACK_BATCH)
        scored = made.x_adv
        preds, _ = scorer.preds(scored.numpy())
        flat = scored.flatten(1)
        out = {"preds": preds.astype(np.int64), "pert": (flat - x.flatten(1)).abs().amax(1).numpy(),
               "in_range": ((flat.amin(1) >= 0.0) & (flat.amax(1) <= 1.0)).numpy(),
               "time_s": np.array(made.time_s)}
        if made.queries is not None:
            out["queries"] = made.queries.numpy()
    if scorer.twin is not None:
        out["agree"] = scorer.twin_agreement(scored, scorer.runtime_preds(scored.numpy(), preds))
    return out


def _check_classes(s: BenchSettings, images: BenchImages, classes: int) -> None:
    if classes < images.meta.num_classes:
        raise UsageError(f"{s.path}: the model outputs {classes} logits, dataset {images.meta.name!r} has "
                         f"{images.meta.num_classes} classes; pass the --dataset the model was trained on")


def _accuracy(s: BenchSettings, images: BenchImages, scorer: Scorer, r: _Results, cache: ChunkCache,
              n_units: int) -> dict[str, Any]:
    """The accuracy section from the merged per-image arrays (the same on every rank)."""
    y_np = images.y.numpy()
    n = images.n
    clean_preds = r["clean_preds"].astype(np.int64)
    scorer.classes, scorer.clean_preds = int(r["classes"].max()), clean_preds
    _check_classes(s, images, scorer.classes)
    accuracy: dict[str, Any] = {
        "samples": n,
        "test_split_images": images.n_total,
        "subset": "all test images" if n == images.n_total else
                  f"fixed random subset (seed {SUBSET_SEED}) of the test split",
        "evaluation_draws": scorer.draws,
        "clean_acc_pct": _pct((clean_preds == y_np[None]).mean(0).mean()),
        "clean_acc_draws_pct": [_pct((p == y_np).mean()) for p in clean_preds],
    }
    worst = WorstCase()
    worst.add("clean", (clean_preds == y_np[None]).mean(0))
    twin_info = _twin_info(s, scorer, r["clean_agree"] > 0.5)
    robust: list[dict[str, Any]] = []
    flags: list[str] = []
    adv_agree: list[np.ndarray] = []
    for a, atk in enumerate(scorer.attack_list):
        row, score = _attack_row(s, images, atk, r, a)
        worst.add(atk.name, score)
        if scorer.twin is not None:
            agree = r["agree"][a] > 0.5
            row["twin_agreement_pct"] = _pct(agree.mean())
            adv_agree.append(agree)
        if not row["within_eps"] or not row["in_unit_range"]:
            flags.append(f"{atk.name} produced images outside the eps ball or [0, 1] "
                         f"(max |x_adv - x| = {row['max_perturbation']:.6g}, eps {atk.eps:g}): its figure is invalid")
        robust.append(row)
    if scorer.twin is not None and adv_agree:
        twin_info["adversarial_agreement_pct"] = _pct(np.concatenate(adv_agree).mean())
    flags += _agreement_flags(s, scorer, twin_info) + gradient_masking_flags(robust, n)
    accuracy["robust"] = robust
    if robust:
        accuracy["worst_case_acc_pct"] = _pct(worst.worst.mean())
        accuracy["worst_case_over"] = worst.names
        accuracy["first_broken_by"] = first_broken_by(worst)
    accuracy["twin"] = twin_info
    accuracy["flags"] = flags
    accuracy["chunks"] = _chunk_section(s, r, cache, n_units)
    accuracy["per_image"] = {
        "test_index": [int(i) for i in images.index] if images.index is not None else None,
        "order": worst.names,
        "correct_draws": [[int(round(v)) for v in sc * scorer.draws] for sc in worst.scores],
        "of_draws": scorer.draws,
    }
    return accuracy


def _attack_row(s: BenchSettings, images: BenchImages, atk: Any, r: _Results,
                a: int) -> tuple[dict[str, Any], np.ndarray]:
    """One attack's report row from the merged arrays, and its per-image score."""
    y_np = images.y.numpy()
    preds = r["preds"][a].astype(np.int64)
    score = (preds == y_np[None]).mean(0)
    source = "queries" if atk.black_box else atk.gradients
    max_pert = float(r["pert"][a].max()) if images.n else 0.0
    time_s = float(r["time_s"][a].sum())
    row = {"name": atk.name, "family": atk.family, "settings": atk.to_dict(), "gradient_source": source,
           "gradients": _GRADIENT_TEXT[source].format(runtime=s.runtime),
           "robust_acc_pct": _pct(score.mean()),
           "robust_acc_draws_pct": [_pct((p == y_np).mean()) for p in preds],
           "max_perturbation": max_pert, "eps": atk.eps, "within_eps": bool(max_pert <= atk.eps + EPS_SLACK),
           "in_unit_range": bool((r["in_range"][a] > 0.5).all()), "time_s": time_s,
           "img_per_s": images.n / time_s if time_s else None}
    if atk.black_box and hasattr(atk, "queries_used"):
        q = r["queries"][a]
        row["queries_mean"] = float(q.mean())
        row["queries_max"] = int(q.max())
    return row, score


def _twin_info(s: BenchSettings, scorer: Scorer, clean_agree: np.ndarray) -> dict[str, Any]:
    """The twin's section: how it was built and its top-1 agreement with the runtime on clean images."""
    if scorer.twin is None:
        s.notes.append(f"twin unavailable ({scorer.twin_error}); no twin agreement reported")
        return {"available": False, "reason": str(scorer.twin_error)}
    info: dict[str, Any] = {"available": True, "build_s": scorer.twin_build_s, "straight_through": True,
                            "noise": scorer.stochastic, "isa": s.isa,
                            "clean_agreement_pct": _pct(clean_agree.mean())}
    if scorer.stochastic:
        s.notes.append("the graph draws noise: twin agreement compares one draw of each, so it is below "
                       "what a deterministic graph would give")
    return info


def _chunk_section(s: BenchSettings, r: _Results, cache: ChunkCache, n_units: int) -> dict[str, Any]:
    """How the work was cut, shared and resumed."""
    computed, cached = int(r["computed"].sum()), int(r["cached"].sum())
    if cached:
        s.notes.append(f"{cached} of {n_units} chunks read from the bench cache {cache.folder} (same model, images "
                       "and settings); delete it to compute them again")
    if r["cache_failures"][0] > 0:
        s.notes.append(f"the bench cache could not be written ({cache.failure or 'on another rank'}); "
                       "the results are complete, but an interrupted rerun would start over")
    return {"images_per_chunk": s.chunk, "chunks": n_units, "computed": computed, "from_cache": cached,
            "ranks": s.world.size, "cache_dir": str(cache.folder) if cache.folder is not None else None,
            "time_s_is": "attack rows' time_s: crafting seconds summed over chunks (over every rank with --nproc; "
                         "a chunk read from the cache counts the time it took when computed)"}


_SOURCE_LABELS = {"queries": "{runtime}", "ste": "twin gradients", "smooth": "smooth surrogate gradients"}
_GRADIENT_TEXT = {"queries": "none ({runtime} queries)", "ste": "differentiable twin, straight-through rounding",
                  "smooth": "smooth surrogate (the graph without rounding), images scored on {runtime}"}


def _agreement_flags(s: BenchSettings, scorer: Scorer, twin_info: dict[str, Any]) -> list[str]:
    flags = []
    for what in ("clean_agreement_pct", "adversarial_agreement_pct"):
        v = twin_info.get(what)
        if v is not None and v < MIN_AGREEMENT_PCT and not scorer.stochastic and not s.emulated:
            flags.append(f"the twin agrees with onnxruntime on only {v:.1f}% of {what.split('_')[0]} images: "
                         "white-box gradients may not reflect the deployed model")
    return flags


# ---------------------------------------------------------------------------------- 6. size, latency


def measure_size(s: BenchSettings, flags: list[str]) -> tuple[Any, dict[str, Any]]:
    """Size and what onnxruntime runs (inspect_model); a saturating int16 pair is a flag."""
    from rcdeploy.deploy.inspect import inspect_model

    graph = inspect_model(s.path, target=s.profile.name)
    pairs = graph.int16_pairs
    if pairs and not pairs.get("saturation_free"):
        flags.append(f"{len(pairs['can_saturate'])} integer kernel(s) can saturate int16 pair sums on x86 CPUs without "
                     f"VNNI (worst pair {pairs.get('worst_pair')} > {pairs.get('limit')}): the figures hold for --isa "
                     f"{s.isa} only; bench with --isa {'exact' if s.isa == 'avx2' else 'avx2'} for the other kind")
    return graph, {
        "file_bytes": graph.file_bytes,
        "params": graph.params,
        "macs": graph.macs_total,
        "macs_integer": graph.macs_integer,
        "integer_mac_share_pct": _pct(graph.integer_mac_share),
        "bytes_by_dtype": graph.bytes_by_dtype,
        "op_histogram": graph.op_histogram,
        "optimized_op_histogram": graph.optimized_op_histogram,
        "macs_counted_on": "onnxruntime's optimized graph at batch 1",
        "int16_pairs": {k: v for k, v in pairs.items() if k != "per_kernel"},
    }


def _latency_sizes(s: BenchSettings) -> list[int]:
    sizes = s.batch_sizes
    if s.profile.name == "mobile" and sizes != [1]:
        s.notes.append(f"target mobile measures batch 1 only (asked for {sizes})")
        sizes = [1]
    fixed = s.dims[0]
    if isinstance(fixed, int) and fixed > 0 and sizes != [fixed]:
        s.notes.append(f"the model takes a fixed batch of {fixed}; latency measured at that batch only")
        sizes = [fixed]
    return sizes


def measure_latency(s: BenchSettings, graph: Any, size: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Latency in a child process; a failure is kept beside the finished accuracy results, not raised."""
    errors: list[str] = []  # steps that failed after others finished: the report keeps what was measured
    if not s.latency:
        return None, errors
    from rcdeploy.deploy.latency import measure_in_subprocess

    sizes = _latency_sizes(s)
    lat = None
    with _ProgressSink(s.progress) as sink:
        update = sink.task(f"latency, target {s.profile.name}, {s.runtime}, batch {','.join(map(str, sizes))}", 1,
                           unit="run")
        try:
            lat = measure_in_subprocess(s.path, target=s.profile.name, batch_sizes=sizes,
                                        min_seconds=s.latency_seconds, seed=s.seed, runtime=s.runtime)
        except (UsageError, RuntimeError, OSError, MemoryError) as e:
            errors.append(f"latency measurement failed ({V.clip(str(e), 200) or type(e).__name__})")
        update(advance=1)
    if lat is not None:
        lat["integer_mac_share_pct"] = size["integer_mac_share_pct"]
        lat["optimized_op_histogram"] = graph.optimized_op_histogram
    return lat, errors


# ---------------------------------------------------------------------------------------- 7. report


def build_report(s: BenchSettings, images: BenchImages, scorer: Scorer, accuracy: dict[str, Any],
                 size: dict[str, Any], lat: dict[str, Any] | None, errors: list[str]) -> dict[str, Any]:
    """The report (format `rcdeploy-bench` v1, `rcdeploy.artifacts.BenchReport`) as a JSON-able dict."""
    card = s.card
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "path": str(s.path),
            "name": s.path.stem if s.path.stem != "model" else f"{s.path.parent.name}/{s.path.name}",
            "file_sha256": s.model_sha256(),
            "sidecar": str(card.path) if card is not None else None,
            "architecture": card.architecture if card is not None else None,
            "bits": card.bits if card is not None else None,
            "input_name": s.input_name,
            "input_shape": s.dims,
            "output_classes": scorer.classes,
            "stochastic": scorer.stochastic,
        },
        "settings": _settings_section(s, images, scorer),
        "size": size,
        "latency": lat,
        "accuracy": accuracy,
        "notes": s.notes,
        "errors": errors,
        "units": {"_pct": "percent of scored test images", "_ms": "milliseconds", "_s": "seconds",
                  "_bytes": "bytes", "img_per_s": "images per second at the median latency",
                  "eps/step/max_perturbation": "L-inf, [0, 1] image units", "macs": "multiply-accumulates per image",
                  "time_s (attack rows)": "seconds crafting, summed over chunks and ranks (a chunk read from the "
                                          "bench cache counts the time it took when computed)"},
        "versions": _versions(s.runtime),
        "time_s": time.perf_counter() - s.t_start,
    }


def _settings_section(s: BenchSettings, images: BenchImages, scorer: Scorer) -> dict[str, Any]:
    import torch

    from rcdeploy.attacks import DEFAULT_STEP_FRACTION

    return {
        "dataset": images.meta.name,
        "data_dir": str(images.data_dir) if images.data_dir is not None else None,
        "samples": images.n,
        "eps": images.eps,
        "eps_source": images.eps_source,
        # iterative attacks' step (fgsm steps by eps, square by its vertex value: see each attack's settings)
        "step": s.step if s.step is not None else images.eps * DEFAULT_STEP_FRACTION,
        "attacks": [a.to_dict() for a in scorer.attack_list],
        "restarts": s.restarts,
        "eot": s.eot,
        "evaluation_draws": scorer.draws,
        "target": s.profile.name,
        "batch_sizes": s.batch_sizes,
        "seed": s.seed,
        "nproc": s.world.size,
        "chunk_images": s.chunk,
        "torch_threads": scorer.work_threads if scorer.work_threads is not None else torch.get_num_threads(),
        "scoring_ort_threads": scorer.work_threads or os.cpu_count() or 1,
        "latency_min_seconds": s.latency_seconds if s.latency else None,
        "norm": "Linf",
        "isa": s.isa,
        "runtime": s.runtime,
        "scored_by": (f"differentiable twin emulating {s.isa} (this CPU: {s.cpu.isa})" if s.emulated
                      else f"{s.runtime} on this CPU ({s.cpu.isa})"),
        "cpu": s.cpu.to_dict(),
    }


def _versions(runtime: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    import rcdeploy
    from rcdeploy.runtime.ov_session import openvino_version

    return {"rcdeploy": rcdeploy.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, **({"openvino": openvino_version()} if runtime == "openvino" else {})}
