"""`rcdeploy export`: checkpoint -> verified integer ONNX (+ QONNX, .ort) and the sidecar model.json.

Everything is built and verified in memory first; files are written only when every check passed,
each to a temp file in the target folder and then renamed, so a failed export leaves nothing behind
and never touches files already there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcdeploy.errors import UsageError, VerificationError
from rcdeploy.io import atomic_write_files, check_writable
from rcdeploy.quant.presets import FLOAT, bits_name, parse_bits
from rcdeploy.quant.spec import QuantSpec, layer_bits, weight_layers
from rcdeploy.runtime.cpu import cpu_kind
from rcdeploy.runtime.ov_session import openvino_version
from rcdeploy.runtime.session import check_runtime

FORMATS = ("qdq", "qonnx", "ort")
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
    from rcdeploy.export.verify import torch_logits

    return float((torch.from_numpy(torch_logits(model, x)).argmax(1) == y).float().mean())


def _strip_noise(model: nn.Module, noise: bool) -> tuple[nn.Module, list[str]]:
    """Noise-injection modules (class name ending in 'Noise'): the integer graph is deterministic."""
    names = [n for n, m in model.named_modules() if type(m).__name__.endswith("Noise")]
    if not names:
        return model, []
    if noise:
        raise UsageError(f"the model injects noise ({', '.join(names[:3])}); the exported graphs are "
                         "deterministic: pass --no-noise to export it without the noise")
    from rcdeploy.quant.spec import set_module

    for n in names:
        set_module(model, n, nn.Identity())
    return model, names


def _shrink(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict[str, Any]]:
    try:
        from rcdeploy.export.shrink import shrink_model
    except ImportError as e:
        raise UsageError(f"--prune-channels is not available in this installation ({e})") from None
    small, report = shrink_model(model, input_shape=input_shape)
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


def export_checkpoint(checkpoint: str | Path = "runs/latest/best.pt", *, bits: int | str | None = None,
                      prune_channels: bool = False, formats: Sequence[str] | str = ("qdq",),
                      output: str | Path = "model.onnx", storage: str | None = None, verify_samples: int = 512,
                      data_dir: str | Path | None = None, noise: bool = True,
                      runtime: str = "onnxruntime") -> dict[str, Any]:
    """Export a training checkpoint; returns a JSON-able summary (files, sizes, verification, kernels).

    runtime: the runtime the file is for. "openvino" stores sub-8-bit weights as plain int8 (OpenVINO runs
    the packed INT4 -> Cast -> Mul chain in float) and also verifies the file in OpenVINO, reporting which
    layers it runs as int8 kernels. storage: None means the runtime's choice (packed / int8).

    Raises UsageError for bad input and VerificationError when an exported file does not compute what
    the PyTorch model computes; in both cases nothing is written.
    """
    from rcdeploy.data import load_dataset
    from rcdeploy.export import sidecar
    from rcdeploy.export.qdq import STORAGES, build_qdq, bytes_by_dtype
    from rcdeploy.export.verify import compare_logits, judge, kernel_report, torch_logits, verify_onnx
    from rcdeploy.train.checkpoint import load_model

    fmts = parse_formats(formats)
    runtime = check_runtime(runtime)
    if storage is None:
        storage = "int8" if runtime == "openvino" else "packed"
    if runtime == "openvino":
        if not openvino_version():  # before any work
            raise UsageError("--runtime openvino needs OpenVINO: pip install 'rcdeploy[openvino]' (or pip install "
                             "openvino)")
    if storage not in STORAGES:
        raise UsageError(f"unknown storage {storage!r}; choose one of: {', '.join(STORAGES)}")
    if int(verify_samples) < 1:
        raise UsageError(f"--verify-samples must be at least 1 (every export is verified), got {verify_samples}")
    paths = output_paths(output)
    for p in paths.values():
        if p.is_dir():
            raise UsageError(f"{p} is a folder; pass a file name with -o, e.g. -o {p / 'model.onnx'}")
    for p in _written(paths, fmts):  # before the work: an unwritable folder fails now, not after verification
        check_writable(p, "-o")

    model, ckpt = load_model(checkpoint)
    meta = ckpt.get("dataset") or {}
    if "name" not in meta or "shape" not in meta:
        raise UsageError(f"{checkpoint}: the checkpoint names no dataset; re-train it with `rcdeploy train`")
    input_shape = tuple(int(s) for s in meta["shape"])
    spec = QuantSpec.from_dict(ckpt["model"]["quant"])
    model, noise_removed = _strip_noise(model, noise)
    cfg = ckpt.get("config") or {}
    data = load_dataset(meta["name"], data_dir if data_dir is not None else cfg.get("data_dir"))
    if tuple(data.meta.shape) != input_shape:
        raise UsageError(f"dataset {meta['name']!r} now has images of shape {list(data.meta.shape)}, the checkpoint "
                         f"was trained on {list(input_shape)}; pass the --data-dir it was trained with")
    x_ver, y_ver = heldout_images(data, int(verify_samples))
    notes: list[str] = []
    summary: dict[str, Any] = {"checkpoint": str(checkpoint), "model": ckpt["model"]["name"],
                               "dataset": meta["name"], "formats": fmts, "storage": storage}
    if noise_removed:
        notes.append(f"noise injection removed for export: {', '.join(noise_removed)}")

    if prune_channels:
        model, summary["pruning"] = _shrink(model, input_shape)

    trained_bits = spec.bits
    summary["trained_bits"] = trained_bits
    summary["bits"] = trained_bits
    if bits is not None:
        want = parse_bits(bits)
        if want == FLOAT:
            raise UsageError("--bits float gives no integer model; export at the trained bits (omit --bits)")
        if trained_bits != FLOAT and want > trained_bits:
            raise UsageError(f"--bits {want} is above the {trained_bits} bits the model was trained with; omit --bits "
                             "to export at the trained bits, or train at the wider width")
        if want != trained_bits:
            from rcdeploy.export.ptq import requantize

            acc_before = _accuracy(model, x_ver, y_ver)
            model, ptq = requantize(model, spec, want, data.train.x.cpu(), data.train.y.cpu())
            acc_after = _accuracy(model, x_ver, y_ver)
            ptq.update({"heldout_images": len(x_ver), "heldout_acc_before": acc_before,
                        "heldout_acc_after": acc_after, "heldout_acc_change": acc_after - acc_before})
            summary["ptq"] = ptq
            summary["bits"] = want
            msg = (f"weights quantized post-training from {bits_name(trained_bits)} to {bits_name(want)} (no "
                   f"retraining): held-out accuracy {acc_before:.2%} -> {acc_after:.2%}; robustness was not re-measured "
                   "(run `rcdeploy bench`)")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)

    files: dict[Path, bytes] = {}
    export_info: dict[str, Any] = {}
    ex = None
    if "qdq" in fmts or "ort" in fmts:
        ex = build_qdq(model, input_shape, storage=storage, doc=f"rcdeploy export of {checkpoint}")
        qdq_bytes = ex.to_bytes()
        # The static int16 proof first: it holds for every CPU, where the comparison below speaks for this one.
        kernels = kernel_report(qdq_bytes, ex.layer_macs)
        _require_saturation_free(kernels["int16_pairs"])
        summary["verification"] = verify_onnx(qdq_bytes, model, x_ver, y_ver, logit_step=ex.logit_step)
        if any(layer.storage == "int4" for layer in ex.layers):
            # Packed INT4 must also fuse in a plain onnxruntime session (no rcdeploy loader): check that too.
            plain = kernel_report(qdq_bytes, ex.layer_macs, widen=False)
            kernels["plain_onnxruntime_integer_mac_share"] = plain.get("integer_mac_share")
            if plain.get("integer_mac_share", 0.0) < kernels.get("integer_mac_share", 0.0):
                notes.append(f"plain onnxruntime runs only {plain.get('integer_mac_share', 0.0):.1%} of MACs of the "
                             "packed INT4 file in integer kernels; load it with rcdeploy.runtime.session.open_session "
                             "or export with --storage int8")
        summary["kernels"] = kernels
        if runtime == "openvino":
            summary["openvino_verification"], summary["openvino_int8_layers"] = _verify_in_openvino(
                ex.model, model, x_ver, ex.logit_step)
            floats = summary["openvino_int8_layers"]["float"]
            if floats:
                notes.append(f"OpenVINO runs {len(floats)} of {summary['openvino_int8_layers']['layers']} conv/matmul "
                             "layers in float (8-bit layers are stored as uint8 so that no CPU saturates them; "
                             "train them at 7 bits, --first-last-bits 7, for int8 kernels in OpenVINO too)")
        if kernels["float_conv_nodes"] or kernels.get("integer_mac_share", 1.0) < 1.0:
            msg = (f"{kernels['float_conv_nodes']} float Conv node(s) remain in onnxruntime's optimized graph; "
                   f"{kernels.get('integer_mac_share', 0.0):.1%} of MACs run in integer kernels")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        export_info.update({
            "layers": [layer.to_dict() for layer in ex.layers],
            "activations": ex.act_quantizers,
            "float_affine_ops": ex.float_affine_ops,
        })
        if "qdq" in fmts:
            files[paths["qdq"]] = qdq_bytes
            export_info.setdefault("files", {})[paths["qdq"].name] = {
                "format": "onnx-qdq", "opset": 21, "bytes": len(qdq_bytes),
                "bytes_by_dtype": bytes_by_dtype(ex.model), "storage": storage}
        if "ort" in fmts:
            from rcdeploy.export.ort_format import check_ort_format, to_ort_format
            from rcdeploy.runtime.session import run_logits

            ort_bytes, ort_config = to_ort_format(qdq_bytes, paths["ort"].name)
            session = check_ort_format(ort_bytes)
            xo = x_ver[:ORT_CHECK_IMAGES]
            ort_check = compare_logits(torch_logits(model, xo), run_logits(session, xo.numpy()), ex.logit_step)
            failure = judge(ort_check)
            if failure:
                raise VerificationError(f"the .ort file: {failure}; nothing was written")
            summary["ort_verification"] = ort_check
            files[paths["ort"]] = ort_bytes
            files[paths["ort_config"]] = ort_config.encode()
            export_info.setdefault("files", {})[paths["ort"].name] = {
                "format": "ort", "bytes": len(ort_bytes), "required_operators": paths["ort_config"].name}
    if "qonnx" in fmts:
        from rcdeploy.export.qonnx_export import check_qonnx, export_qonnx_bytes

        qonnx_bytes = export_qonnx_bytes(model, input_shape)
        summary["qonnx_verification"] = check_qonnx(qonnx_bytes, model, x_ver[:QONNX_CHECK_IMAGES])
        files[paths["qonnx"]] = qonnx_bytes
        export_info.setdefault("files", {})[paths["qonnx"].name] = {"format": "qonnx", "bytes": len(qonnx_bytes)}

    layers = export_info.get("layers") or _layer_table(model)
    export_info.setdefault("layers", layers)
    export_info.update({
        "storage": storage,
        "bits": {"trained": trained_bits, "exported": summary["bits"],
                 "weights": {row["name"]: row.get("weight_bits") for row in layers},
                 "activations": _act_bits(model)},
        "channels_kept": {row["name"]: row.get("out_channels") for row in layers},
        "params": int(sum(row.get("params", 0) for row in layers)),
        "macs": int(sum(row.get("macs", 0) or 0 for row in layers)) if ex else None,
        "verification": {k: summary.get(k) for k in ("verification", "ort_verification", "qonnx_verification")
                         if k in summary},
        "kernels": summary.get("kernels"),
        "runtime": runtime,
        "openvino": ({"verification": summary["openvino_verification"], "int8_layers": summary["openvino_int8_layers"],
                      "version": openvino_version()} if runtime == "openvino" and "openvino_verification" in summary
                     else None),
        "exported_on": cpu_kind().to_dict(),
        "pruning": summary.get("pruning"),
        "ptq": summary.get("ptq"),
        "notes": notes,
    })
    card = sidecar.build_card(ckpt=ckpt, model_spec=ckpt["model"], export=export_info)
    files[paths["sidecar"]] = sidecar.card_text(card).encode()

    atomic_write_files(files)
    summary["files"] = {str(p): len(b) for p, b in files.items()}
    summary["params"] = export_info["params"]
    summary["macs"] = export_info["macs"]
    summary["notes"] = notes
    return sidecar.jsonable(summary)


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
    if ver:
        steps = ver.get("max_abs_logit_diff_steps")
        console.print(f"verified on {ver['samples']} held-out images: top-1 agreement {ver['top1_agreement']:.2%}, "
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
