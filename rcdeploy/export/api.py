"""`rcdeploy export`: checkpoint -> verified integer ONNX (+ QONNX, .ort) and the sidecar model.json.

Everything is built and verified in memory first; files are written only when every check passed,
each to a temp file in the target folder and then renamed, so a failed export leaves nothing behind
and never touches files already there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcdeploy.artifacts._json import jsonable
from rcdeploy.artifacts.checkpoint import Checkpoint
from rcdeploy.artifacts.model_card import ModelCard
from rcdeploy.errors import UsageError, VerificationError
from rcdeploy.export import sidecar
from rcdeploy.io import atomic_write_files, check_writable
from rcdeploy.names import EXPORT_FORMATS
from rcdeploy.quant.presets import FLOAT, bits_name, parse_bits
from rcdeploy.quant.spec import layer_bits, weight_layers
from rcdeploy.runtime.cpu import cpu_kind
from rcdeploy.runtime.ov_session import openvino_version
from rcdeploy.runtime.session import check_runtime

FORMATS = tuple(EXPORT_FORMATS.names())  # qdq, qonnx, ort: declared in rcdeploy.names
QONNX_CHECK_IMAGES = 8  # qonnx's executor runs node by node (~0.5 s per ResNet-20 image)
ORT_CHECK_IMAGES = 256


def output_paths(output: str | Path) -> dict[str, Path]:
    """Where each artifact goes, all next to `output` (which must end in .onnx)."""
    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"output {str(out)!r} must be an .onnx file name, e.g. -o model.onnx")
    stem = out.with_suffix("")
    if out.name.lower().endswith(".qonnx.onnx"):
        raise UsageError(f"output {str(out)!r}: name the integer model (e.g. model.onnx); the QONNX file is "
                         "written next to it as model.qonnx.onnx")
    return {"qdq": out, "qonnx": Path(f"{stem}.qonnx.onnx"), "ort": Path(f"{stem}.ort"),
            "ort_config": Path(f"{stem}.required_operators.config"), "sidecar": Path(f"{stem}.json")}


def _written(paths: dict[str, Path], fmts: Sequence[str]) -> list[Path]:
    """The files an export with `fmts` writes (the sidecar always)."""
    keys = {"qdq": ["qdq"], "ort": ["ort", "ort_config"], "qonnx": ["qonnx"]}
    return [paths[k] for f in fmts for k in keys[f]] + [paths["sidecar"]]


def parse_formats(formats: Sequence[str] | str) -> list[str]:
    items = [formats] if isinstance(formats, str) else list(formats)
    names: list[str] = []
    for item in items:
        for f in str(item).split(","):
            f = f.strip().lower()
            if not f:
                continue
            if f == "all":
                names += list(FORMATS)
            elif f in FORMATS:
                names.append(f)
            else:
                raise UsageError(f"unknown export format {f!r}; choose from: {', '.join(FORMATS)}, all")
    if not names:
        raise UsageError(f"no export format given; choose from: {', '.join(FORMATS)}, all")
    return [f for f in FORMATS if f in names]


def heldout_images(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n images never trained on: the validation split, topped up from the test split.

    Verification picks nothing, so reading test images is safe; small datasets (digits: 144 val images)
    need the top-up for a 99.5% agreement bar to be meaningful.
    """
    xs, ys = [data.val.x], [data.val.y]
    if len(data.val) < n:
        xs.append(data.test.x)
        ys.append(data.test.y)
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    if len(x) == 0:
        raise UsageError(f"dataset {data.meta.name!r} has no held-out images to verify the export on")
    return x.cpu(), y.cpu()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy; a stochastic model draws its noise from a fixed seed, so two calls (before and
    after PTQ) compare on the same draws."""
    from rcdeploy.export.verify import torch_draws

    return float((torch.from_numpy(torch_draws(model, x, 1)[0]).argmax(1) == y).float().mean())


def _noise_info(model: nn.Module) -> dict[str, float]:
    """Noise-injection modules (class name ending in 'Noise') that are on: module name -> coefficient."""
    from rcdeploy.export.qdq import is_noise_module

    return {n: float(getattr(m, "coeff", float("nan"))) for n, m in model.named_modules()
            if is_noise_module(m) and getattr(m, "enabled", True) and getattr(m, "coeff", 1) != 0}


def _strip_noise(model: nn.Module, noise: bool) -> tuple[nn.Module, list[str]]:
    """Noise-injection modules (class name ending in 'Noise'): kept (`noise`: the exported graphs draw it,
    as in training), or replaced by Identity (`--no-noise`: a deterministic graph). Returns the removed."""
    from rcdeploy.export.qdq import is_noise_module

    names = [n for n, m in model.named_modules() if is_noise_module(m)]
    if not names or noise:
        return model, []
    from rcdeploy.quant.spec import set_module

    for n in names:
        set_module(model, n, nn.Identity())
    return model, names


def _noise_card(kept: dict[str, float], removed: list[str], coeffs: dict[str, float]) -> dict[str, Any] | None:
    """The model card's `noise` section: whether the graph is stochastic, and the noise it draws."""
    if not kept and not removed:
        return None
    values = sorted(set((kept or coeffs).values()))
    return {"stochastic": bool(kept), "kind": "feynman-kac",
            "formula": "x + coefficient * std(x per image, Bessel-corrected) * RandomNormalLike(x)",
            "coefficient": values[0] if len(values) == 1 else values, "modules": len(kept) or len(removed),
            "onnx_op": "RandomNormalLike" if kept else None,
            "removed": bool(removed), "evaluation": "EOT: average over draws (rcdeploy bench --eot N)" if kept
            else "deterministic: exported with --no-noise"}


def _shrink(model: nn.Module, input_shape: tuple[int, ...], channel_multiple: int = 1
            ) -> tuple[nn.Module, dict[str, Any]]:
    try:
        from rcdeploy.export.shrink import shrink_model
    except ImportError as e:
        raise UsageError(f"--prune-channels is not available in this installation ({e})") from None
    small, report = shrink_model(model, input_shape=input_shape, channel_multiple=channel_multiple)
    return small.eval(), (report.to_dict() if hasattr(report, "to_dict") else dict(report))


def _layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Weight layers of a model that was not written as an integer graph (QONNX-only exports)."""
    rows = []
    for name, m in weight_layers(model):
        out = getattr(m, "out_channels", getattr(m, "out_features", None))
        rows.append({"name": name, "weight_bits": layer_bits(m), "out_channels": out,
                     "params": sum(p.numel() for p in (m.weight, m.bias) if p is not None)})
    return rows


def _act_bits(model: nn.Module) -> dict[str, int | None]:
    """Bits of every activation quantizer (None where quantization is off)."""
    import brevitas.nn as qnn

    out: dict[str, int | None] = {}
    for name, m in model.named_modules():
        if isinstance(m, (qnn.QuantReLU, qnn.QuantIdentity)):
            out[name] = int(m.act_quant.bit_width()) if m.act_quant.is_quant_enabled else None
    return out


@dataclass
class ExportJob:
    """The export's settings, checked and resolved before any work."""

    checkpoint: str | Path
    fmts: list[str]
    storage: str
    runtime: str
    paths: dict[str, Path]
    bits: int | str | None
    prune_channels: bool
    channel_multiple: int
    verify_samples: int
    data_dir: str | Path | None
    noise: bool


@dataclass
class ExportResult:
    """What `rcdeploy.export` returns: the model card written, and the summary the CLI prints (`--json`)."""

    card: ModelCard
    summary: dict[str, Any]

    @property
    def files(self) -> dict[str, int]:
        """Written file -> bytes."""
        return dict(self.summary.get("files") or {})


@dataclass
class _Built:
    """What the export has so far: the model being exported, its files in memory, and the figures."""

    model: nn.Module
    x_ver: torch.Tensor
    y_ver: torch.Tensor
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    files: dict[Path, bytes] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # the model card's export sections
    integer: Any = None  # the QDQ export (rcdeploy.export.qdq), when one was built


def export_checkpoint(checkpoint: str | Path = "runs/latest/best.pt", *, bits: int | str | None = None,
                      prune_channels: bool = False, channel_multiple: int = 1,
                      formats: Sequence[str] | str = ("qdq",),
                      output: str | Path = "model.onnx", storage: str | None = None, verify_samples: int = 512,
                      data_dir: str | Path | None = None, noise: bool = True,
                      runtime: str = "onnxruntime") -> dict[str, Any]:
    """Export a training checkpoint; returns a JSON-able summary (files, sizes, verification, kernels).

    The summary of `export_model` (which also returns the typed model card); same settings.
    """
    return export_model(checkpoint, bits=bits, prune_channels=prune_channels, channel_multiple=channel_multiple,
                        formats=formats, output=output, storage=storage, verify_samples=verify_samples,
                        data_dir=data_dir, noise=noise, runtime=runtime).summary


def export_model(checkpoint: str | Path = "runs/latest/best.pt", *, bits: int | str | None = None,
                 prune_channels: bool = False, channel_multiple: int = 1, formats: Sequence[str] | str = ("qdq",),
                 output: str | Path = "model.onnx", storage: str | None = None, verify_samples: int = 512,
                 data_dir: str | Path | None = None, noise: bool = True,
                 runtime: str = "onnxruntime") -> ExportResult:
    """Export a training checkpoint: load -> transform -> one writer per format (each verified) -> card.

    runtime: the runtime the file is for. "openvino" stores sub-8-bit weights as plain int8 (OpenVINO runs
    the packed INT4 -> Cast -> Mul chain in float) and also verifies the file in OpenVINO, reporting which
    layers it runs as int8 kernels. storage: None means the runtime's choice (packed / int8).
    channel_multiple: with prune_channels, each channel group keeps a multiple of this many channels (zero
    channels are kept to round up): onnxruntime's fast int8 conv kernel needs at least 16 output channels, so
    16 trades bytes for speed on narrow models (BENCHMARKS.md, "Pruned ResNet-20"); 1 keeps the fewest.

    Raises UsageError for bad input and VerificationError when an exported file does not compute what
    the PyTorch model computes; in both cases nothing is written.
    """
    job = resolve_job(checkpoint, bits=bits, prune_channels=prune_channels, channel_multiple=channel_multiple,
                      formats=formats, output=output, storage=storage, verify_samples=verify_samples,
                      data_dir=data_dir, noise=noise, runtime=runtime)
    ckpt, data, built = load(job)
    transform(job, ckpt, data, built)
    for fmt in WRITERS:
        if any(f in job.fmts for f in WRITERS[fmt][0]):
            WRITERS[fmt][1](job, built)
    card = write_card(job, ckpt, built)
    return ExportResult(card=card, summary=jsonable(built.summary))


# --------------------------------------------------------------------------------------- 1. settings


def resolve_job(checkpoint: str | Path, **kw: Any) -> ExportJob:
    """Check every setting and every output path before the work (an unwritable folder fails now)."""
    from rcdeploy.export.qdq import STORAGES

    fmts = parse_formats(kw["formats"])
    runtime = check_runtime(kw["runtime"])
    storage = kw["storage"] if kw["storage"] is not None else ("int8" if runtime == "openvino" else "packed")
    if runtime == "openvino" and not openvino_version():  # before any work
        raise UsageError("--runtime openvino needs OpenVINO: pip install 'rcdeploy[openvino]' (or pip install "
                         "openvino)")
    if storage not in STORAGES:
        raise UsageError(f"unknown storage {storage!r}; choose one of: {', '.join(STORAGES)}")
    multiple = kw.get("channel_multiple", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or not 1 <= multiple <= 4096:
        raise UsageError(f"--channel-multiple must be an integer from 1 to 4096, got {multiple!r}")
    if multiple > 1 and not kw["prune_channels"]:
        raise UsageError("--channel-multiple rounds the channels --prune-channels keeps; pass --prune-channels too")
    if int(kw["verify_samples"]) < 1:
        raise UsageError(f"--verify-samples must be at least 1 (every export is verified), got {kw['verify_samples']}")
    paths = output_paths(kw["output"])
    for p in paths.values():
        if p.is_dir():
            raise UsageError(f"{p} is a folder; pass a file name with -o, e.g. -o {p / 'model.onnx'}")
    for p in _written(paths, fmts):  # before the work: an unwritable folder fails now, not after verification
        check_writable(p, "-o")
    return ExportJob(checkpoint=checkpoint, fmts=fmts, storage=storage, runtime=runtime, paths=paths,
                     bits=kw["bits"], prune_channels=kw["prune_channels"], channel_multiple=multiple,
                     verify_samples=int(kw["verify_samples"]),
                     data_dir=kw["data_dir"], noise=kw["noise"])


# ------------------------------------------------------------------------------------------- 2. load


def load(job: ExportJob) -> tuple[Checkpoint, Any, _Built]:
    """The checkpoint's model, its dataset (verification images, PTQ calibration) and the held-out images."""
    from rcdeploy.data import load_dataset

    ckpt = Checkpoint.load(job.checkpoint)
    model = ckpt.build_model()
    if ckpt.dataset_name is None or ckpt.input_shape is None:
        raise UsageError(f"{job.checkpoint}: the checkpoint names no dataset; re-train it with `rcdeploy train`")
    coeffs = _noise_info(model)
    model, noise_removed = _strip_noise(model, job.noise)
    data = load_dataset(ckpt.dataset_name, job.data_dir if job.data_dir is not None else ckpt.data_dir)
    if tuple(data.meta.shape) != ckpt.input_shape:
        raise UsageError(f"dataset {ckpt.dataset_name!r} now has images of shape {list(data.meta.shape)}, the "
                         f"checkpoint was trained on {list(ckpt.input_shape)}; pass the --data-dir it was trained with")
    x_ver, y_ver = heldout_images(data, job.verify_samples)
    summary = {"checkpoint": str(job.checkpoint), "model": ckpt.model_name, "dataset": ckpt.dataset_name,
               "formats": job.fmts, "storage": job.storage}
    built = _Built(model=model, x_ver=x_ver, y_ver=y_ver, summary=summary)
    if noise_removed:
        built.notes.append(f"noise injection removed for export: {', '.join(noise_removed)}")
    kept = _noise_info(model)
    noise = _noise_card(kept, noise_removed, coeffs)
    if noise:
        built.info["noise"] = noise
        summary["noise"] = noise
    if kept:
        built.notes.append(f"stochastic graph: {len(kept)} noise module(s) draw RandomNormalLike noise on every run, "
                           "as in training; score it with EOT (rcdeploy bench --eot N), or export with --no-noise "
                           "for a deterministic file")
    return ckpt, data, built


# -------------------------------------------------------------------------------------- 3. transform


def transform(job: ExportJob, ckpt: Checkpoint, data: Any, built: _Built) -> None:
    """Physical channel removal, then post-training quantization to `--bits` below the trained bits."""
    if job.prune_channels:
        built.model, built.summary["pruning"] = _shrink(built.model, ckpt.input_shape, job.channel_multiple)
    trained_bits = ckpt.quant.bits
    built.summary["trained_bits"] = trained_bits
    built.summary["bits"] = trained_bits
    if job.bits is None:
        return
    want = parse_bits(job.bits)
    if want == FLOAT:
        raise UsageError("--bits float gives no integer model; export at the trained bits (omit --bits)")
    if ckpt.bit_allocation:  # per-layer bits pin every layer: a uniform --bits would change none of them
        raise UsageError(f"--bits {job.bits}: this checkpoint's bits were chosen per layer (--bits auto); export it "
                         "at those bits (omit --bits)")
    if trained_bits != FLOAT and want > trained_bits:
        raise UsageError(f"--bits {want} is above the {trained_bits} bits the model was trained with; omit --bits "
                         "to export at the trained bits, or train at the wider width")
    if want != trained_bits:
        _requantize(ckpt, data, built, want)


def _requantize(ckpt: Checkpoint, data: Any, built: _Built, want: int) -> None:
    from rcdeploy.export.ptq import requantize

    trained_bits = ckpt.quant.bits
    acc_before = _accuracy(built.model, built.x_ver, built.y_ver)
    built.model, ptq = requantize(built.model, ckpt.quant, want, data.train.x.cpu(), data.train.y.cpu())
    acc_after = _accuracy(built.model, built.x_ver, built.y_ver)
    ptq.update({"heldout_images": len(built.x_ver), "heldout_acc_before": acc_before,
                "heldout_acc_after": acc_after, "heldout_acc_change": acc_after - acc_before})
    built.summary["ptq"] = ptq
    built.summary["bits"] = want
    msg = (f"weights quantized post-training from {bits_name(trained_bits)} to {bits_name(want)} (no "
           f"retraining): held-out accuracy {acc_before:.2%} -> {acc_after:.2%}; robustness was not re-measured "
           "(run `rcdeploy bench`)")
    warnings.warn(msg, stacklevel=4)
    built.notes.append(msg)


# ---------------------------------------------------------------------------------------- 4. writers


def write_integer(job: ExportJob, built: _Built) -> None:
    """The QDQ graph (qdq, and the .ort conversion of it): int16 proof, verification, kernel checks."""
    from rcdeploy.export.qdq import build_qdq, bytes_by_dtype
    from rcdeploy.export.verify import kernel_report, verify_onnx, verify_stochastic_onnx

    ex = build_qdq(built.model, ckpt_shape(built), storage=job.storage, doc=f"rcdeploy export of {job.checkpoint}")
    built.integer = ex
    qdq_bytes = ex.to_bytes()
    # The static int16 proof first: it holds for every CPU, where the comparison below speaks for this one.
    kernels = kernel_report(qdq_bytes, ex.layer_macs)
    _require_saturation_free(kernels["int16_pairs"])
    # A stochastic graph: exact with the noise off, then by distribution (EOT means) with it on.
    verify = verify_stochastic_onnx if ex.stochastic else verify_onnx
    built.summary["verification"] = verify(qdq_bytes, built.model, built.x_ver, built.y_ver, logit_step=ex.logit_step)
    _check_plain_int4(ex, qdq_bytes, kernels, built.notes)
    built.summary["kernels"] = kernels
    if job.runtime == "openvino":
        _openvino_check(ex, built)
    if kernels["float_conv_nodes"] or kernels.get("integer_mac_share", 1.0) < 1.0:
        msg = (f"{kernels['float_conv_nodes']} float Conv node(s) remain in onnxruntime's optimized graph; "
               f"{kernels.get('integer_mac_share', 0.0):.1%} of MACs run in integer kernels")
        warnings.warn(msg, stacklevel=4)
        built.notes.append(msg)
    built.info.update({"layers": [layer.to_dict() for layer in ex.layers], "activations": ex.act_quantizers,
                       "float_affine_ops": ex.float_affine_ops})
    if "qdq" in job.fmts:
        built.files[job.paths["qdq"]] = qdq_bytes
        built.info.setdefault("files", {})[job.paths["qdq"].name] = {
            "format": "onnx-qdq", "opset": 21, "bytes": len(qdq_bytes),
            "bytes_by_dtype": bytes_by_dtype(ex.model), "storage": job.storage}
    if "ort" in job.fmts:
        write_ort(job, built, qdq_bytes)


def ckpt_shape(built: _Built) -> tuple[int, ...]:
    return tuple(int(s) for s in built.x_ver.shape[1:])


def _check_plain_int4(ex: Any, qdq_bytes: bytes, kernels: dict[str, Any], notes: list[str]) -> None:
    """Packed INT4 must also fuse in a plain onnxruntime session (no rcdeploy loader): check that too."""
    from rcdeploy.export.verify import kernel_report

    if not any(layer.storage == "int4" for layer in ex.layers):
        return
    plain = kernel_report(qdq_bytes, ex.layer_macs, widen=False)
    kernels["plain_onnxruntime_integer_mac_share"] = plain.get("integer_mac_share")
    if plain.get("integer_mac_share", 0.0) < kernels.get("integer_mac_share", 0.0):
        notes.append(f"plain onnxruntime runs only {plain.get('integer_mac_share', 0.0):.1%} of MACs of the "
                     "packed INT4 file in integer kernels; load it with rcdeploy.runtime.session.open_session "
                     "or export with --storage int8")


def _openvino_check(ex: Any, built: _Built) -> None:
    summary = built.summary
    if ex.stochastic:  # checked exactly with the noise off (noise at its expectation in the graph)
        from rcdeploy.export.verify import noise_at_expectation
        from rcdeploy.models.enresnet import noise_disabled

        with noise_disabled(built.model):
            summary["openvino_verification"], summary["openvino_int8_layers"] = _verify_in_openvino(
                noise_at_expectation(ex.model), built.model, built.x_ver, ex.logit_step)
        summary["openvino_verification"]["noise"] = "off (RandomNormalLike at its expectation)"
    else:
        summary["openvino_verification"], summary["openvino_int8_layers"] = _verify_in_openvino(
            ex.model, built.model, built.x_ver, ex.logit_step)
    floats = summary["openvino_int8_layers"]["float"]
    if floats:
        built.notes.append(f"OpenVINO runs {len(floats)} of {summary['openvino_int8_layers']['layers']} conv/matmul "
                           "layers in float (8-bit layers are stored as uint8 so that no CPU saturates them; "
                           "train them at 7 bits, --first-last-bits 7, for int8 kernels in OpenVINO too)")


def write_ort(job: ExportJob, built: _Built, qdq_bytes: bytes) -> None:
    """The .ort file (mobile, reduced build config), checked in onnxruntime against the PyTorch model."""
    from rcdeploy.export.ort_format import check_ort_format, to_ort_format
    from rcdeploy.export.verify import check_distribution, compare_logits, judge, torch_logits
    from rcdeploy.runtime.session import run_logits

    ort_bytes, ort_config = to_ort_format(qdq_bytes, job.paths["ort"].name)
    session = check_ort_format(ort_bytes)
    xo = built.x_ver[:ORT_CHECK_IMAGES]
    if built.integer.stochastic:  # the noise is inside the .ort file: judged by distribution
        try:
            ort_check = check_distribution(lambda a: run_logits(session, a), built.model, xo, built.y_ver[:len(xo)],
                                           logit_step=built.integer.logit_step)
        except VerificationError as e:
            raise VerificationError(f"the .ort file: {e}") from None
    else:
        ort_check = compare_logits(torch_logits(built.model, xo), run_logits(session, xo.numpy()),
                                   built.integer.logit_step)
        failure = judge(ort_check)
        if failure:
            raise VerificationError(f"the .ort file: {failure}; nothing was written")
    built.summary["ort_verification"] = ort_check
    built.files[job.paths["ort"]] = ort_bytes
    built.files[job.paths["ort_config"]] = ort_config.encode()
    built.info.setdefault("files", {})[job.paths["ort"].name] = {
        "format": "ort", "bytes": len(ort_bytes), "required_operators": job.paths["ort_config"].name}


def write_qonnx(job: ExportJob, built: _Built) -> None:
    """The QONNX graph (FINN / FPGA tool flows), checked with qonnx's own executor."""
    from rcdeploy.export.qonnx_export import check_qonnx, export_qonnx_bytes
    from rcdeploy.models.enresnet import noise_disabled

    noisy = bool(_noise_info(built.model))
    # QONNX cannot carry the noise: FINN compiles no random op, and qonnx's executor cannot even run the
    # RandomNormalLike and dynamic Reshape that torch's exporter writes for it (no static shapes). So the
    # QONNX file is the network with the noise off, checked against PyTorch with the noise off, and says so.
    with noise_disabled(built.model):
        qonnx_bytes = export_qonnx_bytes(built.model, ckpt_shape(built))
        built.summary["qonnx_verification"] = check_qonnx(qonnx_bytes, built.model, built.x_ver[:QONNX_CHECK_IMAGES])
    if noisy:
        built.summary["qonnx_verification"]["noise"] = "off: the QONNX file is deterministic"
        built.notes.append(f"the QONNX file {job.paths['qonnx'].name} has no noise (QONNX / FINN flows have no "
                           "random op): it is the network with the noise off; the integer file carries the noise")
    built.files[job.paths["qonnx"]] = qonnx_bytes
    built.info.setdefault("files", {})[job.paths["qonnx"].name] = {
        "format": "qonnx", "bytes": len(qonnx_bytes), **({"noise": "off"} if noisy else {})}


# Export formats: writer -> (the --format names it serves, the writer). The single source of format names.
WRITERS: dict[str, tuple[tuple[str, ...], Any]] = {
    "integer": (("qdq", "ort"), write_integer),
    "qonnx": (("qonnx",), write_qonnx),
}


# ------------------------------------------------------------------------------------------- 5. card


def write_card(job: ExportJob, ckpt: Checkpoint, built: _Built) -> ModelCard:
    """The model card from the checkpoint and the figures; then every file, atomically."""
    summary, info = built.summary, built.info
    layers = info.get("layers") or _layer_table(built.model)
    info.setdefault("layers", layers)
    info.update({
        "storage": job.storage,
        "bits": {"trained": summary["trained_bits"], "exported": summary["bits"],
                 "weights": {row["name"]: row.get("weight_bits") for row in layers},
                 "activations": _act_bits(built.model)},
        "channels_kept": {row["name"]: row.get("out_channels") for row in layers},
        "params": int(sum(row.get("params", 0) for row in layers)),
        "macs": int(sum(row.get("macs", 0) or 0 for row in layers)) if built.integer else None,
        "verification": {k: summary.get(k) for k in ("verification", "ort_verification", "qonnx_verification")
                         if k in summary},
        "kernels": summary.get("kernels"),
        "runtime": job.runtime,
        "openvino": ({"verification": summary["openvino_verification"], "int8_layers": summary["openvino_int8_layers"],
                      "version": openvino_version()} if job.runtime == "openvino" and "openvino_verification" in summary
                     else None),
        "exported_on": cpu_kind().to_dict(),
        "pruning": summary.get("pruning"),
        "ptq": summary.get("ptq"),
        "notes": built.notes,
    })
    from rcdeploy.models.tucker import low_rank_report

    low_rank = low_rank_report(built.model, layers, (ckpt.model.get("kwargs") or {}).get("low_rank"))
    if low_rank is not None:  # CSTAR: factorized layers' ranks, params and MACs against their dense originals
        info["low_rank"] = summary["low_rank"] = low_rank
    card = sidecar.build_card(ckpt, info, built.integer.model if built.integer is not None else None)
    built.files[job.paths["sidecar"]] = card.text().encode()
    atomic_write_files(built.files)
    summary["files"] = {str(p): len(b) for p, b in built.files.items()}
    summary["params"] = info["params"]
    summary["macs"] = info["macs"]
    summary["notes"] = built.notes
    return card


def _require_saturation_free(pairs: dict[str, Any]) -> None:
    """VerificationError naming the worst layer when any integer kernel can saturate an int16 pair sum."""
    if pairs["saturation_free"]:
        return
    worst = max((r for r in pairs["per_kernel"] if r["can_saturate"]), key=lambda r: r["worst_pair"] or 0)
    raise VerificationError(
        f"layer {worst['layer'] or worst['node']} ({worst['op']}) can saturate int16 pair sums on x86 CPUs "
        f"without VNNI (worst |a_i w_i + a_j w_j| {worst['worst_pair']} > {pairs['limit']}; "
        f"{len(pairs['can_saturate_layers'])} kernel(s) in all); nothing was written")


def _verify_in_openvino(proto: Any, model: nn.Module, x: torch.Tensor, logit_step: float) -> tuple[dict, dict]:
    """The export verification, run in OpenVINO on the same images; and which layers it runs as int8."""
    from rcdeploy.export.verify import compare_logits, judge, torch_logits
    from rcdeploy.runtime.ov_session import OpenVinoSession
    from rcdeploy.runtime.session import run_logits

    session = OpenVinoSession(proto, threads=1)
    check = compare_logits(torch_logits(model, x), run_logits(session, x.numpy()), logit_step)
    failure = judge(check)
    if failure:
        raise VerificationError(f"in OpenVINO, {failure}; nothing was written")
    return check, session.int8_layers()


def render_summary(summary: dict[str, Any], console: Any) -> None:
    """Print an export summary as a small rich table (the CLI's human-readable output)."""
    from rich.table import Table

    table = Table(title=f"rcdeploy export: {summary.get('model')} on {summary.get('dataset')}", show_header=True)
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for path, size in (summary.get("files") or {}).items():
        table.add_row(path, f"{size:,}")
    console.print(table)
    if summary.get("pruning"):
        from rcdeploy.export.shrink import ShrinkReport

        console.print(ShrinkReport.from_dict(summary["pruning"]).to_table())
    ver = summary.get("verification")
    stochastic = ver.get("mode") == "stochastic" if ver else False
    if stochastic:
        console.print(f"stochastic graph, verified by distribution: {ver['draws']} noise draws of {ver['samples']} "
                      f"held-out images; EOT accuracy onnx {ver.get('onnx_accuracy', float('nan')):.2%} / torch "
                      f"{ver.get('torch_accuracy', float('nan')):.2%}, per-draw logit spread ratio {ver['spread_ratio']:.2f}")
        ver = ver.get("noise_off")  # and exactly, with the noise off on both sides
    if ver:
        steps = ver.get("max_abs_logit_diff_steps")
        console.print(("noise off: " if stochastic else "")
                      + f"verified on {ver['samples']} held-out images: top-1 agreement {ver['top1_agreement']:.2%}, "
                      f"max |logit diff| {ver['max_abs_logit_diff']:.4g}"
                      + (f" ({steps:.1f} feature steps)" if steps is not None else "")
                      + (f", accuracy onnx {ver['onnx_accuracy']:.2%} / torch {ver['torch_accuracy']:.2%}"
                         if "onnx_accuracy" in ver else ""))
    kernels = summary.get("kernels")
    if kernels and "integer_mac_share" in kernels:
        console.print(f"onnxruntime integer kernels: {kernels['integer_mac_share']:.1%} of "
                      f"{kernels['macs_total']:,} MACs; float Conv nodes: {kernels['float_conv_nodes']}")
    ov = summary.get("openvino_verification")
    if ov:
        layers = summary.get("openvino_int8_layers") or {}
        console.print(f"verified in OpenVINO: top-1 agreement {ov['top1_agreement']:.2%}, max |logit diff| "
                      f"{ov['max_abs_logit_diff']:.4g}; int8 kernels for {layers.get('int8')} of {layers.get('layers')} "
                      "conv/matmul layers")
    q = summary.get("qonnx_verification")
    if q:
        console.print(f"QONNX checked with qonnx's executor on {q['samples']} images: agreement "
                      f"{q['top1_agreement']:.0%}, max |logit diff| {q['max_abs_logit_diff']:.3g}")
    for note in summary.get("notes") or []:
        console.print(f"note: {note}")
