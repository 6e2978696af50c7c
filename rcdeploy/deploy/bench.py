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

The steps are modules of their own: settings and images (`bench_inputs`), the scorer (`scoring`),
clean and attacks in chunks (`evaluation`, `attack_figures`, `bench_cache`), the progress bar
(`progress`); this one holds the entry point, the launcher, size and latency, and the report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from rcdeploy import validate as V
from rcdeploy.deploy.attack_figures import first_broken_by, gradient_masking_flags
from rcdeploy.deploy.bench_inputs import (
    CHUNK_IMAGES,
    DEFAULT_SAMPLES,
    BenchImages,
    BenchSettings,
    load_images,
    parse_batch_sizes,
    read_sidecar,
    resolve_settings,
)
from rcdeploy.deploy.evaluation import ATTACK_BATCH, _pct, evaluate
from rcdeploy.deploy.progress import _ProgressSink
from rcdeploy.deploy.scoring import Scorer
from rcdeploy.distributed import World, job_size
from rcdeploy.errors import UsageError

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


# ------------------------------------------------------------------------------------------- bench


def bench_model(
    model: str | Path,
    *,
    attacks: str = "ifgsm20",
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    samples: int | None = None,
    indices: Sequence[int] | None = None,
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
    indices: the test-split indices to score instead (not with `samples`): e.g. AutoAttack's cascade, where
        each attack runs only on the images every earlier one failed on.
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
    kw: dict[str, Any] = dict(attacks=attacks, dataset=dataset, data_dir=data_dir, samples=samples, indices=indices, eps=eps,
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
