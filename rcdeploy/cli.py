"""`rcdeploy` command line: each command parses its options, then calls one library function.

Heavy imports (torch, brevitas, onnxruntime) happen inside commands so `--help` stays instant; the
choices and the names in help texts come from the registries declared in `rcdeploy.names`, which
imports no implementation.
Bad input anywhere is one `error:` line on stderr and exit code 2; a failed export verification
exits 1; an interrupted training run saves and exits 130.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from rcdeploy import names as N
from rcdeploy.errors import UsageError, VerificationError, WorkerFailed
from rcdeploy.registry import Registry

MAX_SEED = 2**32 - 1
INTERNAL_ERROR_EXIT = 3  # a bug in rcdeploy, not bad input: still one line, the traceback only on request
DEBUG_ENV = "RCDEPLOY_DEBUG"  # set to 1 for the traceback of an internal error
# Warnings from libraries the user cannot act on (Brevitas' optional-kernel notices, torch/onnx deprecations):
# the CLI owns the terminal, and an error must stay one line. rcdeploy's own warnings stay, as one line each.
QUIET_MODULES = r"(brevitas|torch|onnx|onnxscript|onnxruntime|qonnx|onnxoptimizer|sklearn|numpy|openvino|rich)(\.|$)"


class FiniteFloat(click.ParamType):
    """A float that is finite and inside (low, high]: click's FloatRange lets NaN through."""

    name = "float"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        import math

        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not self.low < v <= self.high:
            self.fail(f"{value!r} must be a finite number in ({self.low:g}, {self.high:g}]", param, ctx)
        return v


def _described(registry: Registry[Any]) -> str:
    """'cpu (all cores, batched) or mobile (1 thread, batch 1)': names with their declared help words."""
    return N.listing([f"{n} ({registry.declaration(n).help})" if registry.declaration(n).help else n
                      for n in registry.names()])


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)  # long lines stay whole in logs


def _check_out(path: str | None, label: str) -> None:
    """Before the work: an output that cannot be written fails now, not after it."""
    if path is not None and path != "-":
        from rcdeploy.io import check_writable

        check_writable(path, label)


def _json_output(path: str | None, payload: Any, label: str = "--json") -> list:
    """The JSON output as a pending write (`rcdeploy.io.deliver`); '-' prints it now."""
    if path is None:
        return []
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if path == "-":
        click.echo(text, nl=False)
        return []
    from pathlib import Path

    from rcdeploy.io import Pending, atomic_write_text

    return [Pending(label, Path(path), lambda: atomic_write_text(path, text), text.encode())]


def _deliver(outputs: list) -> None:
    from rcdeploy.io import deliver

    deliver(outputs)


EXAMPLES_TRAIN = """
\b
Examples:
  rcdeploy train                                    # the quick-start: digits, 4-bit, PGD, 50% channels pruned
  rcdeploy train --config cifar10-resnet20-w4 --data-dir data/cifar10 --epochs 5 --name r20w4
  rcdeploy train --resume runs/r20w4                # continue an interrupted run with its own settings
\b
Defaults: a value given here overrides the recipe's; '[default: ...]' shows the built-in value, and the
quick-start recipe's where it differs (it applies when neither --dataset nor --model names something else).
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="rcdeploy")
def cli() -> None:
    """Robust, compressed, integer image classifiers: train -> export -> bench.

    \b
    Examples:
      rcdeploy train --epochs 3 --name demo             # runs/demo/{best.pt,last.pt,metrics.jsonl,config.yaml}
      rcdeploy export runs/demo/best.pt --bits 4 --prune-channels -o demo.onnx
      rcdeploy bench demo.onnx --attack ifgsm20 --json demo.json --csv runs.csv

    Bad input is one `error:` line on stderr and exit code 2; see `rcdeploy COMMAND --help`.
    """


# ----------------------------------------------------------------------------------------- train
def _key_values(items: tuple[str, ...], what: str) -> dict[str, Any]:
    """('lambda1=0.05', 'beta=1') -> {'lambda1': 0.05, 'beta': 1}; values read as YAML scalars."""
    from rcdeploy.validate import safe_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--{what.replace('_', '-')[:-1]} {item!r}: write KEY=VALUE, e.g. lambda1=0.05")
        try:  # bounded like a recipe: a value is YAML too
            out[key.strip()] = safe_yaml(value, f"--{what.replace('_', '-')[:-1]} {key.strip()}")
        except UsageError:
            out[key.strip()] = value
    return out


def _default(name: str) -> str:
    """What a train option falls back to: the built-in default, and the quick-start's where it differs."""
    import dataclasses

    from rcdeploy.config import TrainConfig, load_recipe

    f = {x.name: x for x in dataclasses.fields(TrainConfig)}[name]
    builtin = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    quick = load_recipe("quickstart").get(name, builtin)
    shown = "none" if builtin in (None, {}, []) else str(builtin)
    return shown if quick == builtin else f"{quick} in the quick-start, else {shown}"


def _opt(*decls: str, setting: str | None = None, **kw: Any):
    """A train option whose help shows its default (from TrainConfig and the quick-start recipe)."""
    name = setting or decls[-1].lstrip("-").replace("-", "_")
    return click.option(*decls, show_default=_default(name), **kw)


@cli.command(epilog=EXAMPLES_TRAIN)
@click.option("--config", "recipe", help="Recipe YAML (path or bundled name).", show_default="quickstart when "
              "neither --dataset nor --model names something else, else the built-in defaults")
@_opt("--model", help="Model name (e.g. small_cnn, resnet20, preact_resnet18, mobilenetv2, en5resnet20).")
@_opt("--width", type=float, help="Channel width multiplier (none: the model's own).")
@_opt("--dataset", help="digits, mnist, fashion-mnist, cifar10, cifar100, svhn or folder:PATH.")
@_opt("--data-dir", help="Folder holding the dataset files (none: $RCDEPLOY_DATA, else ./data).")
@_opt("--download", is_flag=True, default=None, help="Fetch the standard dataset files (needs a network).")
@_opt("--bits", help="Weight bits: float, 8, 7, 6, 5, 4, 3, 2 (ternary), 1 (binary), or auto (per layer, "
      "Lipschitz-guided, within --size-budget).")
@_opt("--size-budget", help="--bits auto: bytes of the weight layers, e.g. 20KB (KB = 1000 B, KiB = 1024 B; "
      "weights at their bits + 8 B per output channel).")
@_opt("--auto-bits-epochs", type=click.IntRange(0, 100_000), help="--bits auto: adversarial epochs at 8 bits "
      "before the layers are measured (then --epochs of fine-tuning at the chosen bits).")
@_opt("--auto-bits-amplification", help="--bits auto: weigh each layer's error by its Lipschitz bound to the "
      "logits (bound) or by the logit change measured with only that layer quantized (measured).")
@_opt("--act-bits", help="Activation bits (8 keeps int8 kernels at export).")
@_opt("--first-last-bits", help="Weight bits of the first and last layers (7 keeps every layer "
      "on u8 x s8 kernels at export, which OpenVINO runs as int8 too).")
@_opt("--adv", help=f"Adversarial objective: {', '.join(N.OBJECTIVES.names())}.")
@_opt("--eps", help="L-inf budget in image units, e.g. 8/255 (none: the dataset's literature value).")
@_opt("--steps", type=click.IntRange(1, 10_000), help="Attack steps during training (pgd, trades).")
@_opt("--step-size", help="Attack step size, e.g. 2/255 (none: 2.5*eps/steps).")
@_opt("--beta", type=float, help="TRADES trade-off weight.")
@_opt("--alpha", type=float, help="mixed: weight of the adversarial term, (1 - alpha) CE(x) + alpha CE(x_adv); "
      "ard: weight of the distillation term.")
@_opt("--teacher", help="ard: the teacher to distill, an rcdeploy checkpoint (best.pt, last.pt or its run folder) "
      "on the same dataset; never trained or saved with the student, its path and sha256 go into the run's config.")
@_opt("--distill-temperature", type=float, help="ard: temperature T of alpha T^2 KL(teacher^T(x) || "
      "student^T(x_adv)) + (1 - alpha) CE(student(x), y).")
@_opt("--quant", "quant_method", setting="quant_method", help=f"Weight quantization training: {N.listing(N.QUANT_METHODS.names())}.")
@_opt("--br-lambda", type=float, help="Binary-Relax: initial lambda of (w + lambda Q(w)) / (1 + lambda).")
@_opt("--br-growth", type=float, help="Binary-Relax: lambda multiplier per epoch.")
@_opt("--eot", type=click.IntRange(1, 10_000), help="Noise draws per evaluation for stochastic models (EnResNet).")
@_opt("--val-attack", help="Attack(s) of the per-epoch validation that picks best.pt: a name, a comma list or "
      "a preset (per image the worst), e.g. apgd-ce20 or autoattack-fast.")
@_opt("--model-arg", "model_args", setting="model_args", multiple=True, metavar="KEY=VALUE",
      help="Extra model setting, repeatable, e.g. --model-arg noise=0 (EnResNet without noise).")
@_opt("--epochs", type=click.IntRange(1, 100_000), help="Training epochs (with --resume: train the run further).")
@_opt("--batch-size", type=click.IntRange(1, 1 << 20), help="Images per training batch.")
@_opt("--train-samples", type=click.IntRange(1), help="Train on a seeded subset of this many images (short runs).")
@_opt("--lr", type=float, help="Peak learning rate.")
@_opt("--schedule", help=f"{N.listing(N.SCHEDULES.names())}.")
@_opt("--optimizer", help=f"{N.listing(N.OPTIMIZERS.names())}.")
@_opt("--prune-channels", type=float, help="Target share of prunable channels to remove, e.g. 0.5.")
@_opt("--sparsity", help=f"Sparsity method: {', '.join(N.SPARSITY.names(kind=N.CHANNELS))} (channels); "
      f"{', '.join(N.SPARSITY.names(kind=N.WEIGHTS))} (weights).")
@_opt("--sparsity-param", "sparsity_params", setting="sparsity_params", multiple=True, metavar="KEY=VALUE",
      help="Sparsity method setting, repeatable, e.g. --sparsity-param lambda1=0.05 (rgsm).")
@_opt("--prune-weights", type=float, help=f"{'/'.join(N.SPARSITY.names(kind=N.WEIGHTS))}: target share of weights "
      "zeroed, e.g. 0.8.")
@_opt("--codebook-bits", type=click.IntRange(1, 8), help="atmc: at most 2**b nonzero values per weight tensor "
      "(none: 4).")
@_opt("--channel-multiple", type=click.IntRange(1, 4096), help="Round kept channel counts (and low ranks) up to "
      "a multiple.")
@_opt("--low-rank", help="CSTAR: Tucker-2 factorized layers storing 1/N of their dense parameters, e.g. 8x "
      "(ranks chosen globally; ADMM, then the swap to factors, then fine-tuning).")
@_opt("--rank-rho", type=float, help="Low rank: ADMM penalty weight rho.")
@_opt("--seed", type=click.IntRange(0, MAX_SEED), help="Random seed (weights, batches, attacks).")
@_opt("--device", help="auto, cpu or cuda.")
@_opt("--threads", type=click.IntRange(1, 4096), help="CPU threads for torch (none: torch's default; tiny "
      "inputs run best on 1).")
@_opt("--nproc", type=click.IntRange(1, 4096), help="Worker processes on this machine (DistributedDataParallel: "
      "gloo on CPU, nccl with one GPU each on CUDA); several machines: torchrun -m rcdeploy.train.")
@_opt("--micro-batches", type=click.IntRange(1, 1 << 20), help="Slices of each batch, shared by the ranks (a "
      "multiple of --nproc; one process computes them in turn, same step). None: --nproc.")
@_opt("--sync-bn", is_flag=True, default=None, help="SyncBatchNorm across ranks (CUDA only).")
@_opt("--max-restarts", type=click.IntRange(0, 1000), help="--nproc: if a worker dies, restart all of them up to "
      "this often; they resume the run from its last checkpoint.")
@_opt("--out", help="Folder for run folders.")
@_opt("--name", help="Run folder name (none: model-dataset-bits-adv-time); an existing one is refused "
      "unless resumed.")
@click.option("--resume", type=click.Path(), show_default="a new run", help="Continue an interrupted run (its folder "
              "or last.pt) with its own settings; only --epochs, --device, --threads, --nproc and --max-restarts may "
              "change them.")
@click.option("--json", "json_path", show_default="not written",
              help="Write the final metrics as JSON to FILE ('-' for stdout).")
def train(recipe: str | None, resume: str | None, json_path: str | None, **overrides: Any) -> None:
    """Adversarial quantization-aware training; writes runs/NAME/{best.pt,last.pt,metrics.jsonl,config.yaml}."""
    from rcdeploy.api import train as train_run
    from rcdeploy.distributed import env_rank
    from rcdeploy.train.progress import RichReporter

    _check_out(json_path, "--json")
    for key in ("sparsity_params", "model_args"):
        overrides[key] = _key_values(overrides[key], key) if overrides.get(key) else None
    console = _console()
    if env_rank() != 0:  # a torchrun rank other than 0: rank 0 reports
        train_run(recipe, resume=resume, **overrides)
        return
    with RichReporter(console) as reporter:
        result = train_run(recipe, resume=resume, reporter=reporter, **overrides)
    for key, (old, new) in result.changed.items():
        console.print(f"note: --{key} {new} overrides the run's {old}"
                      + (" (the learning-rate schedule follows the new length)" if key == "epochs" else ""))
    for note in result.notes:
        console.print(f"note: {note}")
    summary = {"run_dir": str(result.run_dir), "best": result.best,
               "last": result.metrics[-1] if result.metrics else None, "interrupted": result.interrupted}
    if result.interrupted:
        console.print(f"interrupted: saved {result.run_dir / 'last.pt'}; continue with "
                      f"`rcdeploy train --resume {result.run_dir}`")
        _deliver(_json_output(json_path, summary))
        sys.exit(130)
    if result.best:
        b = result.best
        console.print(f"best (epoch {b['epoch']}): val clean {b['val_clean_acc']:.1f}%, "
                      f"val {b['val_attack']} {b['val_robust_acc']:.1f}% -> {result.run_dir / 'best.pt'}")
    else:
        console.print(f"note: no epoch was eligible for best.pt (see the phases above); export "
                      f"{result.run_dir / 'last.pt'} instead")
    _deliver(_json_output(json_path, summary))


# ---------------------------------------------------------------------------------------- export
@cli.command(epilog="""
\b
Examples:
  rcdeploy export                                   # runs/latest/best.pt -> model.onnx + model.json
  rcdeploy export --bits 4 --prune-channels -o small.onnx
  rcdeploy export runs/NAME/best.pt --format all    # + model.qonnx.onnx and model.ort
""")
@click.argument("checkpoint", required=False, default="runs/latest/best.pt")
@click.option("--bits", help="Export weight bits (below the trained bits: post-training quantization).",
              show_default="the trained bits")
@click.option("--prune-channels", is_flag=True, show_default="off",
              help="Physically remove the channels training zeroed.")
@click.option("--channel-multiple", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="With --prune-channels: keep a multiple of N channels per group (zero channels round it up). "
              "16 makes narrow models faster in onnxruntime (its fast int8 conv needs >= 16 output channels) at "
              "some bytes; 1 keeps the fewest.")
@click.option("--format", "formats", default="qdq", show_default=True,
              help=f"Comma list of {', '.join(N.EXPORT_FORMATS.names())}, or all.")
@click.option("--storage", type=click.Choice(N.STORAGES.names()), show_default="packed for onnxruntime, int8 for "
              "openvino", help="Sub-8-bit weights stored packed as INT4 (half the bytes; onnxruntime still runs "
              "int8 kernels) or as plain int8.")
@click.option("--runtime", default="onnxruntime", show_default=True,
              help=f"Runtime the file is for: {N.listing(N.RUNTIMES.names())} (int8 storage, also verified in "
              "OpenVINO).")
@click.option("-o", "--output", default="model.onnx", show_default=True,
              help="The integer model; model.json (and other formats) are written beside it.")
@click.option("--data-dir", help="Dataset folder for verification images.", show_default="the training run's")
@click.option("--verify-samples", type=click.IntRange(1, 1_000_000), default=512, show_default=True,
              help="Held-out images the export is verified on.")
@click.option("--no-noise", is_flag=True, show_default="off",
              help="Stochastic models (EnResNet): export without the noise (a deterministic file, noted in "
              "model.json). By default the noise is kept: the file draws it as in training (score it with "
              "bench --eot N).")
@click.option("--json", "json_path", show_default="not written",
              help="Write the export summary as JSON to FILE ('-' for stdout).")
def export(checkpoint: str, bits: str | None, prune_channels: bool, channel_multiple: int, formats: str,
           storage: str | None, output: str, data_dir: str | None, verify_samples: int, no_noise: bool,
           json_path: str | None, runtime: str) -> None:
    """Verified integer ONNX (+ QONNX, .ort, model.json sidecar) from a training checkpoint."""
    from rcdeploy.api import export as export_run
    from rcdeploy.export.api import render_summary

    _check_out(json_path, "--json")
    summary = export_run(checkpoint, bits=bits, prune_channels=prune_channels, channel_multiple=channel_multiple,
                         formats=formats, output=output,
                         storage=storage, verify_samples=verify_samples, data_dir=data_dir, noise=not no_noise,
                         runtime=runtime).summary
    render_summary(summary, _console(stderr=json_path == "-"))
    _deliver(_json_output(json_path, summary))


# ----------------------------------------------------------------------------------------- bench
@cli.command(epilog="""
\b
Examples:
  rcdeploy bench model.onnx                         # ifgsm20 at the sidecar's eps, latency on all cores
  rcdeploy bench model.onnx --attack ifgsm20,pgd20,square1000 --json report.json --csv runs.csv
  rcdeploy bench other.onnx --dataset cifar10 --data-dir data/cifar10 --eps 8/255 --no-latency
""")
@click.argument("model", type=click.Path())
@click.option("--attack", "attacks", default="ifgsm20", show_default=True,
              help="Comma list: fgsm, ifgsmN, pgdN, cwN, squareN, apgd-ceN, apgd-tN, fab-tN; a white-box name + @smooth takes the "
              "gradients of the graph's smooth surrogate; presets autoattack, autoattack-fast; or 'none'.")
@click.option("--dataset", help="Dataset name.", show_default="the sidecar model.json's")
@click.option("--data-dir", help="Dataset folder.", show_default="the sidecar's, else $RCDEPLOY_DATA or ./data")
@click.option("--samples", type=click.IntRange(1), help="Test images to score.",
              show_default="all, up to 1000")
@click.option("--eps", help="L-inf eps in [0, 1] image units, e.g. 8/255.",
              show_default="the sidecar's training eps, else the dataset's")
@click.option("--step", help="Step size of iterative attacks.", show_default="eps/4")
@click.option("--restarts", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Random restarts (pgd, cw, square).")
@click.option("--eot", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Stochastic graphs: gradient draws per step and onnxruntime draws per accuracy.")
@click.option("--target", type=click.Choice(N.TARGETS.names()), default="cpu", show_default=True,
              help=f"Latency profile: {_described(N.TARGETS)}.")
@click.option("--batch-sizes", help="Latency batch sizes, e.g. 1,64.", show_default="1,64 on cpu; 1 on mobile")
@click.option("--latency-seconds", type=FiniteFloat(0, 3600), default=1.0, show_default=True,
              help="Timed seconds per batch size, at least (more while medians are unstable).")
@click.option("--no-latency", is_flag=True, show_default="off", help="Skip the latency measurement.")
@click.option("--threads", type=click.IntRange(1, 4096), help="torch / scoring threads for the attacks.",
              show_default="1 for tiny inputs, else the libraries' own")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the attacks' random starts and of the latency inputs.")
@click.option("--nproc", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Processes the clean and attack chunks are shared over (local, gloo); any N gives the same "
              "per-image results. Each takes cores/N torch threads unless --threads; latency is measured after "
              "the attacks, by rank 0 alone. Under torchrun, each rank runs its share instead.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Keep each finished chunk here (in a subfolder named by a hash of the model file, images and "
              "every setting that changes results) and skip the chunks found on a rerun: an interrupted bench "
              "resumes. Kept after a complete run, so a rerun reads every chunk back; delete it to free the space.",
              show_default="MODEL.bench-cache beside the model (none if not writable)")
@click.option("--no-cache", is_flag=True, show_default="off", help="Read and write no chunk cache.")
@click.option("--isa", help=f"Integer kernels as computed on: {_described(N.ISAS)}; another kind than this "
              "CPU's is emulated by the twin.",
              show_default="this CPU's")
@click.option("--runtime", default="onnxruntime", show_default=True,
              help=f"Runtime that scores and times the file: {N.listing(N.RUNTIMES.names())} (pip install "
              "'rcdeploy[openvino]').")
@click.option("--json", "json_path", show_default="not written",
              help="Write the full report as JSON to FILE ('-' for stdout).")
@click.option("--csv", "csv_path", show_default="not written", help="Append one summary row to FILE (a new file, or one an earlier "
              "`bench --csv` wrote).")
def bench(model: str, no_latency: bool, latency_seconds: float, **kwargs: Any) -> None:
    """Latency, size, clean and robust accuracy of a deployed ONNX file, in onnxruntime."""
    from pathlib import Path

    from rcdeploy.api import bench as bench_run
    from rcdeploy.deploy.report import CSV_COLUMNS, csv_pending, render_bench
    from rcdeploy.io import check_csv_appendable

    json_path, csv_path = kwargs.pop("json_path"), kwargs.pop("csv_path")
    _check_out(json_path, "--json")  # before the bench: a bad output path fails in a second
    if csv_path is not None:
        check_csv_appendable(csv_path, CSV_COLUMNS, "--csv")
    if json_path is not None and csv_path is not None and Path(json_path) == Path(csv_path):
        raise UsageError(f"--json and --csv both name {json_path}; pass two files")
    report = bench_run(model, latency=not no_latency, latency_seconds=latency_seconds, progress=True,
                       cache=not kwargs.pop("no_cache"), **kwargs)
    if report is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return
    # With --json -, stdout carries the JSON alone; the table goes to stderr.
    render_bench(report, _console(stderr=json_path == "-"))
    outputs = _json_output(json_path, report.to_dict())
    if csv_path is not None:
        outputs.append(csv_pending(csv_path, report))
    _deliver(outputs)
    if report.errors:
        written = [str(p) for p in (json_path, csv_path) if p not in (None, "-")]
        kept = f"; the other results were written to {', '.join(written)}" if written else ""
        raise UsageError(f"{report.errors[0]}{kept}")


# --------------------------------------------------------------------------------------- compare
@cli.command(epilog="""
\b
Examples:
  rcdeploy compare a.json b.json                    # one row per report, Pareto-front rows starred
  rcdeploy compare runs/*.json --plot pareto.png    # --plot needs matplotlib
  rcdeploy compare a.json b.json --json - | jq .rows
""")
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("--plot", show_default="not drawn",
              help="Write a Pareto plot (PNG) of accuracy vs size and latency (needs matplotlib).")
@click.option("--json", "json_path", show_default="not written", help="Write the comparison as JSON ('-' for stdout).")
def compare(reports: tuple[str, ...], plot: str | None, json_path: str | None) -> None:
    """Table (and Pareto plot) of several `bench --json` reports."""
    from rcdeploy.deploy.report import compare_reports, render_compare

    _check_out(json_path, "--json")
    _check_out(plot, "--plot")
    table = compare_reports(list(reports), plot=plot)
    render_compare(table, _console(stderr=json_path == "-"))
    _deliver(_json_output(json_path, table))


# --------------------------------------------------------------------------------------- inspect
@cli.command(epilog="""
\b
Examples:
  rcdeploy inspect model.onnx                       # op histogram, integer-kernel share, bytes by dtype
  rcdeploy inspect model.onnx --target mobile       # the graph of a 1-thread mobile session
  rcdeploy inspect model.onnx --json inspect.json
""")
@click.argument("model", type=click.Path())
@click.option("--target", type=click.Choice(N.TARGETS.names()), default="cpu", show_default=True,
              help="Session profile whose optimized graph is inspected.")
@click.option("--json", "json_path", show_default="not written", help="Write the report as JSON ('-' for stdout).")
def inspect(model: str, target: str, json_path: str | None) -> None:
    """Op histogram (as stored and as onnxruntime runs it), integer-kernel MAC share, bytes by dtype."""
    from rcdeploy.deploy.inspect import inspect_model
    from rcdeploy.deploy.report import render_inspect

    _check_out(json_path, "--json")
    report = inspect_model(model, target=target)
    render_inspect(report, _console(stderr=json_path == "-"))
    _deliver(_json_output(json_path, report.to_dict()))


# ------------------------------------------------------------------------------------ entry point
@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM before the training loop installs its own handler (imports, data loading) is an
    interrupt like Ctrl-C: exit 130, as documented, instead of the default 143."""
    import os
    import signal
    import threading

    def handler(signum: int, frame: Any) -> None:
        if _inside_import(frame):
            # An exception thrown into an import leaves half-initialized modules behind (seen: torch's
            # sympy without `.core`, then an internal error instead of exit 130): the interrupt waits
            # for the import to finish, by sending the signal again 20 ms later.
            timer = threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
            return
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _inside_import(frame: Any) -> bool:
    """Whether the interrupted code runs inside the import system (any frame of importlib's bootstrap)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _quiet_warnings() -> None:
    """Third-party warnings off; rcdeploy's own as one `warning:` line each (inside catch_warnings)."""
    import warnings

    warnings.filterwarnings("ignore", module=QUIET_MODULES)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def one_line(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message).strip().splitlines()
        click.echo(f"warning: {text[0] if text else category.__name__}", err=True)

    warnings.showwarning = one_line


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one stderr line and an exit code, never a traceback."""
    import os
    import warnings

    from rcdeploy.validate import clip

    try:
        with _sigterm_interrupts(), warnings.catch_warnings():
            _quiet_warnings()
            cli.main(args=argv, prog_name="rcdeploy", standalone_mode=False)
    except UsageError as e:
        _fail(" ".join(str(e).split("\n")), 2)
    except VerificationError as e:
        _fail(f"export verification failed: {e}", 1)
    except WorkerFailed as e:
        _fail(str(e), 1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        _fail(e.format_message().replace("\n", " "), e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        _fail("out of memory; use a smaller --batch-size, --samples or dataset", 2)
    except OSError as e:  # the system refused (disk full, permissions) outside a checked path
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or clip(str(e)) or type(e).__name__}", 2)
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        _fail(f"internal error ({type(e).__name__}: {clip(str(e))}); rerun with {DEBUG_ENV}=1 for the traceback "
              "and report it", INTERNAL_ERROR_EXIT)


if __name__ == "__main__":
    main()
