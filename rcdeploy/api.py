"""The Python API: `rcdeploy.train`, `rcdeploy.export`, `rcdeploy.bench`, with the settings of the commands.

The CLI calls exactly these. Each returns the stage's typed artifact: `train` the `RunResult` (its
`checkpoint()` is the `Checkpoint` of best.pt), `export` an `ExportResult` (`.card` is the `ModelCard`
written, `.summary` what `export --json` prints), `bench` the `BenchReport`.

`rcdeploy.train` and `rcdeploy.export` are also the names of the stage packages; those packages are
callable (see `_callable_stage`), so `import rcdeploy.train.loop` never hides the function.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rcdeploy.artifacts import BenchReport
    from rcdeploy.export.api import ExportResult
    from rcdeploy.train.loop import Reporter, RunResult


def train(config: str | Path | None = None, *, resume: str | Path | None = None,
          reporter: Reporter | None = None, **settings: Any) -> RunResult:
    """Train a run: `config` is a recipe (bundled name or YAML path), `settings` the `rcdeploy train` options
    as keyword arguments (`epochs=1`, `bits=4`, `adv="pgd"`, `sparsity_params={...}`, ...; see TrainConfig).

    With `resume` (a run folder or its last.pt), only epochs / device / threads / nproc may be given.
    `nproc=N` trains on N local processes (DistributedDataParallel); rank 0's RunResult is returned and a
    `reporter` object is not called (it lives in this process): rank 0 prints progress instead.
    """
    from rcdeploy.config import default_recipe, make_config
    from rcdeploy.distributed import job_size
    from rcdeploy.errors import UsageError
    from rcdeploy.train.loop import Reporter, fit, resumed_settings

    if resume is not None and config is not None:
        raise UsageError("--config cannot change a run on --resume (it continues with its own settings)")
    cfg = None if resume is not None else make_config(config or default_recipe(settings), settings)
    nproc = (cfg or resumed_settings(resume, settings)).nproc
    if nproc > 1 and job_size() == 1:  # start the workers; inside a torchrun job this process is one of them
        from rcdeploy.train.scaleout import launch_fit

        # The reporter stays here; rank 0 shows progress on stderr when one was asked for.
        return launch_fit(cfg, resume, settings, nproc, progress=reporter is not None)
    return fit(cfg, resume=resume, overrides=settings, reporter=reporter or Reporter())


def export(checkpoint: str | Path = "runs/latest/best.pt", **settings: Any) -> ExportResult:
    """Export a checkpoint (the `rcdeploy export` options as keyword arguments: bits, prune_channels,
    channel_multiple, formats, output, storage, verify_samples, data_dir, noise, runtime); nothing is written
    unless verified."""
    from rcdeploy.export.api import export_model

    return export_model(checkpoint, **settings)


def bench(model: str | Path, **settings: Any) -> BenchReport | None:
    """Bench an ONNX file (the `rcdeploy bench` options as keyword arguments: attacks, dataset, data_dir,
    samples, eps, step, restarts, eot, target, batch_sizes, seed, threads, latency, latency_seconds, isa,
    runtime, progress, nproc, cache, cache_dir).

    `nproc=N` shares the chunks over N local processes (same per-image results as one); finished chunks
    are cached beside the model unless `cache=False` (see `rcdeploy.deploy.bench.bench_model`). Inside a
    torchrun job, ranks other than 0 return None."""
    from rcdeploy.artifacts import BenchReport
    from rcdeploy.deploy.bench import bench_model

    settings.setdefault("progress", False)
    report = bench_model(model, **settings)
    return None if report is None else BenchReport.from_dict(report)


def _callable_stage(module_name: str, function: Any) -> None:
    """Make the stage package `module_name` callable as `function` (rcdeploy.train(...) is the API function,
    rcdeploy.train.loop its module): the import system sets `rcdeploy.train` to the package whenever a
    submodule is imported, so the package itself must be the function."""
    module = sys.modules[module_name]

    class CallableStage(types.ModuleType):
        __call__ = staticmethod(function)

    module.__class__ = CallableStage
