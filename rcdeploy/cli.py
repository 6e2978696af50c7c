"""`rcdeploy` command line: each command parses its options, then calls one library function.

Heavy imports (torch, brevitas, onnxruntime) happen inside commands so `--help` stays instant.
Bad input anywhere is one `error:` line on stderr and exit code 2; a failed export verification
exits 1; an interrupted training run saves and exits 130.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from rcdeploy.errors import UsageError, VerificationError


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)  # long lines stay whole in logs


def _write_json(path: str | None, payload: Any) -> None:
    if path is None:
        return
    text = json.dumps(payload, indent=2, default=str)
    if path == "-":
        click.echo(text)
        return
    from rcdeploy.io import atomic_write_text

    atomic_write_text(path, text + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rcdeploy")
def cli() -> None:
    """Robust, compressed, integer image classifiers: train -> export -> bench."""


# ----------------------------------------------------------------------------------------- train
def _key_values(items: tuple[str, ...], what: str) -> dict[str, Any]:
    """('lambda1=0.05', 'beta=1') -> {'lambda1': 0.05, 'beta': 1}; values read as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--{what.replace('_', '-')[:-1]} {item!r}: write KEY=VALUE, e.g. lambda1=0.05")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


@cli.command()
@click.option("--config", "recipe", help="Recipe YAML (path or bundled name); default: the quick-start recipe "
              "when neither --dataset nor --model names something else, else the generic defaults.")
@click.option("--model", help="Model name (e.g. small_cnn, resnet20, preact_resnet18, mobilenetv2, en5resnet20).")
@click.option("--width", type=float, help="Channel width multiplier.")
@click.option("--dataset", help="digits, mnist, fashion-mnist, cifar10, cifar100, svhn or folder:PATH.")
@click.option("--data-dir", help="Folder holding the dataset files (default $RCDEPLOY_DATA or ./data).")
@click.option("--download", is_flag=True, default=None, help="Fetch the standard dataset files (needs a network).")
@click.option("--bits", help="Weight bits: float, 8, 6, 5, 4, 3, 2 (ternary), 1 (binary).")
@click.option("--act-bits", help="Activation bits (8 keeps int8 kernels at export).")
@click.option("--first-last-bits", help="Weight bits of the first and last layers (default 8; 7 keeps every layer "
              "on u8 x s8 kernels at export, which OpenVINO runs as int8 too).")
@click.option("--adv", help="Adversarial objective: none, fgsm-rs, pgd, trades.")
@click.option("--eps", help="L-inf budget in image units, e.g. 8/255.")
@click.option("--steps", type=int, help="Attack steps during training (pgd, trades).")
@click.option("--step-size", help="Attack step size, e.g. 2/255 (default 2.5*eps/steps).")
@click.option("--beta", type=float, help="TRADES trade-off weight.")
@click.option("--quant", "quant_method", help="Weight quantization training: qat (default) or binary-relax.")
@click.option("--br-lambda", type=float, help="Binary-Relax: initial lambda of (w + lambda Q(w)) / (1 + lambda).")
@click.option("--br-growth", type=float, help="Binary-Relax: lambda multiplier per epoch, e.g. 1.05.")
@click.option("--eot", type=int, help="Noise draws per evaluation for stochastic models (EnResNet), e.g. 5.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Extra model setting, repeatable, e.g. --model-arg noise=0 (EnResNet without noise).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--train-samples", type=int, help="Train on a seeded subset of this many images (short runs).")
@click.option("--lr", type=float)
@click.option("--schedule", help="cosine, piecewise or constant.")
@click.option("--optimizer", help="sgd or adam.")
@click.option("--prune-channels", type=float, help="Target share of prunable channels to remove, e.g. 0.5.")
@click.option("--sparsity", help="Sparsity method: group-lasso, rgsm, slimming (channels); rvsm, admm (weights).")
@click.option("--sparsity-param", "sparsity_params", multiple=True, metavar="KEY=VALUE",
              help="Sparsity method setting, repeatable, e.g. --sparsity-param lambda1=0.05 (rgsm).")
@click.option("--prune-weights", type=float, help="rvsm/admm: target share of weights zeroed, e.g. 0.8.")
@click.option("--channel-multiple", type=int, help="Round kept channel counts up to a multiple.")
@click.option("--seed", type=int)
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--threads", type=int, help="CPU threads for torch (tiny models are fastest on 1).")
@click.option("--out", help="Folder for run folders (default runs/).")
@click.option("--name", help="Run folder name.")
@click.option("--resume", type=click.Path(), help="Continue an interrupted run (its folder or last.pt).")
@click.option("--json", "json_path", help="Write the final metrics as JSON to FILE ('-' for stdout).")
def train(recipe: str | None, resume: str | None, json_path: str | None, **overrides: Any) -> None:
    """Adversarial quantization-aware training; writes runs/NAME/{best.pt,last.pt,metrics.jsonl,config.yaml}."""
    from rcdeploy.config import default_recipe, make_config
    from rcdeploy.train.loop import fit
    from rcdeploy.train.progress import RichReporter

    for key in ("sparsity_params", "model_args"):
        overrides[key] = _key_values(overrides[key], key) if overrides.get(key) else None
    if resume is not None:
        cfg = make_config(None, {"epochs": overrides.get("epochs"), "device": overrides.get("device")})
    else:
        cfg = make_config(recipe or default_recipe(overrides), overrides)
    console = _console()
    with RichReporter(console) as reporter:
        result = fit(cfg, resume=resume, reporter=reporter)
    summary = {"run_dir": str(result.run_dir), "best": result.best,
               "last": result.metrics[-1] if result.metrics else None, "interrupted": result.interrupted}
    if result.interrupted:
        console.print(f"interrupted: saved {result.run_dir / 'last.pt'}; continue with "
                      f"`rcdeploy train --resume {result.run_dir}`")
        _write_json(json_path, summary)
        sys.exit(130)
    if result.best:
        b = result.best
        console.print(f"best (epoch {b['epoch']}): val clean {b['val_clean_acc']:.1f}%, "
                      f"val {b['val_attack']} {b['val_robust_acc']:.1f}% -> {result.run_dir / 'best.pt'}")
    _write_json(json_path, summary)


# ---------------------------------------------------------------------------------------- export
@cli.command()
@click.argument("checkpoint", required=False, default="runs/latest/best.pt")
@click.option("--bits", help="Export weight bits (below the trained bits: post-training quantization).")
@click.option("--prune-channels", is_flag=True, help="Physically remove the channels training zeroed.")
@click.option("--format", "formats", default="qdq", show_default=True,
              help="Comma list of qdq, qonnx, ort, or all.")
@click.option("--storage", type=click.Choice(["packed", "int8"]),
              help="Sub-8-bit weights stored packed as INT4 (half the bytes; onnxruntime still runs int8 "
                   "kernels) or as plain int8. Default: packed for onnxruntime, int8 for openvino.")
@click.option("--runtime", default="onnxruntime", show_default=True,
              help="Runtime the file is for: onnxruntime or openvino (int8 storage, also verified in OpenVINO).")
@click.option("-o", "--output", default="model.onnx", show_default=True)
@click.option("--data-dir", help="Dataset folder for verification images.")
@click.option("--verify-samples", type=int, default=512, show_default=True)
@click.option("--no-noise", is_flag=True, help="Stochastic models (EnResNet): export without the noise.")
@click.option("--json", "json_path", help="Write the export summary as JSON to FILE ('-' for stdout).")
def export(checkpoint: str, bits: str | None, prune_channels: bool, formats: str, storage: str | None, output: str,
           data_dir: str | None, verify_samples: int, no_noise: bool, json_path: str | None, runtime: str) -> None:
    """Verified integer ONNX (+ QONNX, .ort, model.json sidecar) from a training checkpoint."""
    from rcdeploy.export.api import export_checkpoint, render_summary

    fmts = ["qdq", "qonnx", "ort"] if formats.strip() == "all" else [f.strip() for f in formats.split(",") if f.strip()]
    summary = export_checkpoint(checkpoint, bits=bits, prune_channels=prune_channels, formats=fmts,
                                output=output, storage=storage, verify_samples=verify_samples, data_dir=data_dir,
                                noise=not no_noise, runtime=runtime)
    render_summary(summary, _console(stderr=False))
    _write_json(json_path, summary)


# ----------------------------------------------------------------------------------------- bench
@cli.command()
@click.argument("model", type=click.Path())
@click.option("--attack", "attacks", default="ifgsm20", show_default=True,
              help="Comma list: fgsm, ifgsmN, pgdN, cwN, squareN (or 'none').")
@click.option("--dataset", help="Dataset (default: the sidecar model.json's).")
@click.option("--data-dir", help="Dataset folder.")
@click.option("--samples", type=int, help="Test images to score (default: all, up to 1000).")
@click.option("--eps", help="L-inf eps in [0, 1] image units, e.g. 8/255 (default: the sidecar's training eps, "
              "else the dataset's).")
@click.option("--step", help="Step size of iterative attacks (default eps/4).")
@click.option("--restarts", type=int, default=1, show_default=True, help="Random restarts (pgd, cw, square).")
@click.option("--eot", type=int, default=1, show_default=True,
              help="Stochastic graphs: gradient draws per step and onnxruntime draws per accuracy.")
@click.option("--target", type=click.Choice(["cpu", "mobile"]), default="cpu", show_default=True,
              help="Latency profile: cpu (all cores, batched) or mobile (1 thread, batch 1).")
@click.option("--batch-sizes", help="Latency batch sizes, e.g. 1,64 (default: 1,64 on cpu; mobile is batch 1).")
@click.option("--latency-seconds", type=float, default=1.0, show_default=True,
              help="Timed seconds per batch size, at least (more while medians are unstable).")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--threads", type=int, help="torch / scoring threads for the attacks (default: 1 for tiny inputs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--isa", help="Integer kernels as computed on: exact (VNNI, AMX, ARM) or avx2 (x86 without VNNI: "
              "u8 x s8 pair sums saturate at int16). Default: this CPU. Another kind is emulated by the twin.")
@click.option("--runtime", default="onnxruntime", show_default=True,
              help="Runtime that scores and times the file: onnxruntime or openvino (pip install 'rcdeploy[openvino]').")
@click.option("--json", "json_path", help="Write the full report as JSON to FILE ('-' for stdout).")
@click.option("--csv", "csv_path", help="Append one summary row to FILE (header when new).")
def bench(model: str, no_latency: bool, latency_seconds: float, **kwargs: Any) -> None:
    """Latency, size, clean and robust accuracy of a deployed ONNX file, in onnxruntime."""
    from rcdeploy.deploy.bench import bench_model
    from rcdeploy.deploy.report import append_csv, render_bench

    json_path, csv_path = kwargs.pop("json_path"), kwargs.pop("csv_path")
    if latency_seconds <= 0:
        raise UsageError(f"--latency-seconds must be > 0, got {latency_seconds}")
    report = bench_model(model, latency=not no_latency, latency_seconds=latency_seconds, **kwargs)
    # With --json -, stdout carries the JSON alone; the table goes to stderr.
    render_bench(report, _console(stderr=json_path == "-"))
    _write_json(json_path, report)
    if csv_path:
        append_csv(csv_path, report)


# --------------------------------------------------------------------------------------- compare
@cli.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("--plot", help="Write a Pareto plot (PNG) of accuracy vs size and latency (needs matplotlib).")
@click.option("--json", "json_path", help="Write the comparison as JSON ('-' for stdout).")
def compare(reports: tuple[str, ...], plot: str | None, json_path: str | None) -> None:
    """Table (and Pareto plot) of several `bench --json` reports."""
    from rcdeploy.deploy.report import compare_reports, render_compare

    table = compare_reports(list(reports), plot=plot)
    render_compare(table, _console(stderr=json_path == "-"))
    _write_json(json_path, table)


# --------------------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("model", type=click.Path())
@click.option("--target", type=click.Choice(["cpu", "mobile"]), default="cpu", show_default=True,
              help="Session profile whose optimized graph is inspected.")
@click.option("--json", "json_path", help="Write the report as JSON ('-' for stdout).")
def inspect(model: str, target: str, json_path: str | None) -> None:
    """Op histogram (as stored and as onnxruntime runs it), integer-kernel MAC share, bytes by dtype."""
    from rcdeploy.deploy.inspect import inspect_model
    from rcdeploy.deploy.report import render_inspect

    report = inspect_model(model, target=target)
    render_inspect(report, _console(stderr=json_path == "-"))
    _write_json(json_path, report.to_dict())


def main(argv: list[str] | None = None) -> None:
    """Entry point: library errors become one stderr line and an exit code, never a traceback."""
    try:
        cli.main(args=argv, prog_name="rcdeploy", standalone_mode=False)
    except UsageError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except VerificationError as e:
        click.echo(f"error: export verification failed: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
