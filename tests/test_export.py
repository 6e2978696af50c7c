"""rcdeploy export: integer ONNX that onnxruntime runs as integer kernels, verified against PyTorch.

Checkpoints are real: Brevitas models trained for a few dozen SGD steps on scikit-learn's digits
(seconds, one thread), with BatchNorm gains randomized first so that folding meets negative gammas.
Everything runs through real onnxruntime sessions, the real qonnx executor and real files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from rcdeploy.data import load_dataset
from rcdeploy.errors import UsageError, VerificationError
from rcdeploy.export.api import export_checkpoint
from rcdeploy.export.qdq import build_qdq
from rcdeploy.export.shrink import zero_channels
from rcdeploy.export.verify import verify_onnx
from rcdeploy.models import create_model
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec
from rcdeploy.runtime.session import optimized_graph
from rcdeploy.train.checkpoint import FORMAT, VERSION, atomic_save, load_model, model_spec

INTEGER_CONV = {"QLinearConv", "NhwcQLinearConv", "ConvInteger"}
FLOAT_CONV = {"Conv", "FusedConv", "NhwcFusedConv"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Brevitas' many small ops crawl when two threads fight over two shared cores; one is 10x faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                sign = torch.where(torch.rand(n, generator=gen) < 0.3, -1.0, 1.0)  # ~30% negative gains
                m.weight.copy_(sign * (0.5 + torch.rand(n, generator=gen)))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))


def make_checkpoint(path: Path, data, name: str, bits: int, *, width: float | None = None, steps: int = 40,
                    act_bits: int = 8, zero: dict | None = None, seed: int = 0, first_last_bits: int = 8) -> Path:
    """Train `name` for `steps` Adam steps on digits and save a real rcdeploy checkpoint.

    Trained to well-separated logits (~95% accuracy): a half-trained model's near-ties flip on any
    rounding difference, which is what export verification exists to catch, not what these tests test."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    meta = data.meta
    quant = QuantSpec(bits=bits, act_bits=act_bits, first_last_bits=first_last_bits)
    kwargs = dict(num_classes=meta.num_classes, in_chans=meta.shape[0], mean=meta.mean, std=meta.std,
                  input_size=meta.shape[1])
    if width is not None:
        kwargs["width"] = width
    model = create_model(name, quant=quant, **kwargs)
    _randomize_bn(model, gen)
    calibrate_activations(model, [data.train.x[i:i + 128] for i in range(0, 512, 128)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        if zero:  # a fixed mask, as in training's fine-tune phase: the rest of the net adapts to it
            zero_channels(model, zero)
        idx = torch.randint(0, len(data.train), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if zero:
        zero_channels(model, zero)
    with torch.no_grad():
        acc = float((model(data.val.x).argmax(1) == data.val.y).float().mean())
    atomic_save({"format": FORMAT, "version": VERSION, "model": model_spec(name, quant, **kwargs),
                 "state_dict": model.state_dict(), "dataset": meta.to_dict(), "eps": 0.1,
                 "config": {"adv": "pgd", "eps": 0.1, "bits": bits, "act_bits": act_bits, "steps": 3},
                 "metrics": {"val_clean_acc": acc}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, digits) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "small_cnn-8": make_checkpoint(root / "sc8.pt", digits, "small_cnn", 8),
        "small_cnn-4": make_checkpoint(root / "sc4.pt", digits, "small_cnn", 4),
        "resnet20-8": make_checkpoint(root / "r8.pt", digits, "resnet20", 8),  # full width
        "resnet20-4": make_checkpoint(root / "r4.pt", digits, "resnet20", 4, width=0.5),
    }


def ops_of(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def faithful(ver: dict, trained: bool = True) -> bool:
    """The export verification's own rule, checked on its figures: logits within tolerance and top-1
    agreement on decisive images, both on >= 99.5% of images (for a trained model, most images are
    decisive, so the second is no formality); plain top-1 agreement still high."""
    return (ver["within_tolerance"] >= 0.995 and ver["decisive_top1_agreement"] >= 0.995
            and (not trained or ver["decisive_samples"] >= 0.5 * ver["samples"]) and ver["top1_agreement"] >= 0.98)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["small_cnn-8", "small_cnn-4", "resnet20-8", "resnet20-4"])
def test_integer_graph_runs_integer_kernels_and_agrees(key: str, ckpts, digits, tmp_path) -> None:
    out = tmp_path / "model.onnx"
    summary = export_checkpoint(ckpts[key], output=out)
    assert out.is_file() and (tmp_path / "model.json").is_file()

    # What onnxruntime really runs, read back from its optimized graph (the deploy loader's way).
    opt = ops_of(optimized_graph(out.read_bytes()))
    assert not FLOAT_CONV & set(opt), opt
    assert sum(opt[k] for k in INTEGER_CONV) == (3 if key.startswith("small_cnn") else 21)
    assert opt["QGemm"] == 1 and opt["QLinearGlobalAveragePool"] == 1
    assert "BatchNormalization" not in opt and "Clip" not in opt and "Relu" not in opt
    if key.startswith("resnet20"):
        assert opt["QLinearAdd"] == 9
    assert summary["kernels"]["integer_mac_share"] == 1.0

    # Opset 21, int32 biases, dynamic batch, float [0,1] NCHW in, logits out.
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert any(t.data_type == TensorProto.INT32 for t in model.graph.initializer)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(float)" and isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 8, 8]
    for n in (1, 7):
        assert session.run(None, {inp.name: digits.val.x[:n].numpy()})[0].shape == (n, 10)

    ver = summary["verification"]
    assert ver["samples"] >= 500 and faithful(ver)
    assert ver["max_abs_logit_diff"] < 0.1 * ver["logit_range"]
    assert abs(ver["onnx_accuracy"] - ver["torch_accuracy"]) <= 0.01


def test_independent_agreement_on_file_and_sidecar(ckpts, digits, tmp_path) -> None:
    """Re-check the written file against the checkpoint's PyTorch model, outside the export code path."""
    out = tmp_path / "r.onnx"
    export_checkpoint(ckpts["resnet20-8"], output=out)
    model, ckpt = load_model(ckpts["resnet20-8"])
    x = torch.cat([digits.val.x, digits.test.x])
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.995
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()

    card = json.loads((tmp_path / "r.json").read_text())
    assert card["dataset"]["name"] == "digits" and card["dataset"]["shape"] == [1, 8, 8]
    assert card["input"]["range"] == [0.0, 1.0] and card["input"]["shape"] == ["batch", 1, 8, 8]
    assert card["training"]["eps"] == 0.1 and card["training"]["adv"] == "pgd"
    assert card["training_metrics"]["last"]["val_clean_acc"] == pytest.approx(ckpt["metrics"]["val_clean_acc"])
    assert card["bits"]["weights"]["stem.1.0"] == 8 and set(card["bits"]["activations"].values()) == {8}
    assert card["channels_kept"]["blocks.8.conv2.0"] == 64
    assert card["params"] > 250_000 and card["macs"] > 2_000_000
    assert card["files"]["r.onnx"]["bytes"] == out.stat().st_size
    assert card["files"]["r.onnx"]["bytes_by_dtype"]["uint8"] > 250_000  # 8-bit layers: u8 x u8 kernels
    assert faithful(card["verification"]["verification"])
    assert set(card["versions"]) >= {"rcdeploy", "torch", "brevitas", "onnx", "onnxruntime"}
    assert sum(layer["negative_bn_gains"] for layer in card["layers"]) > 0  # folding met negative gammas


def test_bn_folding_with_negative_gains_is_exact_enough(digits) -> None:
    """An untrained model with ~30% negative BN gains: the integer signs flip, outputs still agree."""
    gen = torch.Generator().manual_seed(1)
    meta = digits.meta
    model = create_model("resnet20", num_classes=10, in_chans=1, mean=meta.mean, std=meta.std,
                         quant=QuantSpec(bits=4), input_size=8, width=0.5)
    _randomize_bn(model, gen)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    calibrate_activations(model, [digits.train.x[:256]])
    model.eval()
    ex = build_qdq(model, (1, 8, 8))
    assert sum(layer.negative_bn_gains for layer in ex.layers) > 20
    assert all(layer.bn_folded for layer in ex.layers if layer.op == "conv")
    rep = verify_onnx(ex.to_bytes(), model, digits.val.x, digits.val.y, logit_step=ex.logit_step)
    # Untrained: near-tied logits, so the tolerance is the range-bounded one and few images are decisive.
    assert faithful(rep, trained=False)
    assert rep["tolerance_steps"] * rep["logit_step"] <= 0.1 * rep["logit_range"]


def test_4bit_file_is_about_half_and_keeps_int8_kernels(ckpts, tmp_path) -> None:
    sizes = {}
    for key in ("small_cnn-8", "small_cnn-4"):
        out = tmp_path / f"{key}.onnx"
        export_checkpoint(ckpts[key], output=out)
        sizes[key] = out.stat().st_size
    assert sizes["small_cnn-4"] <= 0.55 * sizes["small_cnn-8"], sizes

    # Full-width ResNet-20: trained at 8 bits, exported at 8 and (post-training) at 4 bits.
    r8, r4 = tmp_path / "r8.onnx", tmp_path / "r4.onnx"
    export_checkpoint(ckpts["resnet20-8"], output=r8)
    with pytest.warns(UserWarning, match="post-training"):
        s4 = export_checkpoint(ckpts["resnet20-8"], bits=4, output=r4)
    assert r4.stat().st_size <= 0.55 * r8.stat().st_size, (r4.stat().st_size, r8.stat().st_size)
    ptq = s4["ptq"]
    assert ptq["from_bits"] == 8 and ptq["to_bits"] == 4 and len(ptq["layers"]) == 20  # first/last stay 8-bit
    assert 0.0 <= ptq["heldout_acc_after"] <= 1.0 and "heldout_acc_change" in ptq

    # Packed INT4 really is two values per byte, and the deploy loader still gets int8 kernels.
    model = onnx.load(str(r4))
    int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(int4) == 20
    for t in int4:
        assert len(t.raw_data) == (int(np.prod(t.dims)) + 1) // 2
    for widen in (True, False):  # the deploy loader, and a plain onnxruntime session
        opt = ops_of(optimized_graph(r4.read_bytes(), widen=widen))
        assert opt["QLinearConv"] == 21 and not FLOAT_CONV & set(opt)
    assert s4["kernels"]["plain_onnxruntime_integer_mac_share"] == 1.0

    # storage="int8": the same values stored as int8 (readers without INT4); bigger file, same logits.
    packed, wide = tmp_path / "small_cnn-4.onnx", tmp_path / "sc4w.onnx"
    export_checkpoint(ckpts["small_cnn-4"], output=wide, storage="int8")
    assert not any(t.data_type == TensorProto.INT4 for t in onnx.load(str(wide)).graph.initializer)
    assert wide.stat().st_size > 1.6 * packed.stat().st_size
    plain = ops_of(optimized_graph(wide.read_bytes(), widen=False))
    assert plain["QLinearConv"] == 3 and not FLOAT_CONV & set(plain)
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (packed, wide))
    np.testing.assert_array_equal(a, b)


def test_qonnx_file_runs_in_qonnx_executor(ckpts, digits, tmp_path) -> None:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    from rcdeploy.export.qonnx_export import _ort_readable_single_node_models

    out = tmp_path / "m.onnx"
    summary = export_checkpoint(ckpts["small_cnn-4"], formats=["qonnx"], output=out)
    path = tmp_path / "m.qonnx.onnx"
    assert path.is_file() and not out.exists()  # only what was asked for
    assert summary["qonnx_verification"]["top1_agreement"] == 1.0
    model = onnx.load(str(path))
    assert ops_of(model)["Quant"] >= 8 and any(o.domain.startswith("qonnx") for o in model.opset_import)

    wrapper = cleanup_model(ModelWrapper(str(path)))
    torch_model, _ = load_model(ckpts["small_cnn-4"])
    x = digits.test.x[:3]
    with torch.no_grad():
        ref = torch_model(x).numpy()
    with _ort_readable_single_node_models():
        got = np.concatenate([execute_onnx(wrapper, {wrapper.graph.input[0].name: x[i:i + 1].numpy()})[
            wrapper.graph.output[0].name] for i in range(3)])
    np.testing.assert_allclose(got, ref, atol=1e-3 * max(1.0, np.abs(ref).max()))


def test_ort_format_loads_with_operator_config(ckpts, digits, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    summary = export_checkpoint(ckpts["resnet20-4"], formats="qdq,ort", output=out)
    ort_file, config = tmp_path / "m.ort", tmp_path / "m.required_operators.config"
    assert ort_file.is_file() and config.is_file()
    session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    x = digits.val.x[:32].numpy()
    ref = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.95
    text = config.read_text()
    assert "QLinearConv" in text and "QLinearAdd" in text and "com.microsoft" in text
    assert faithful(summary["ort_verification"])


def test_prune_channels_shrinks_file_and_stays_integer(digits, tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "z.pt", digits, "small_cnn", 4, steps=25,
                           zero={"features.0.0": list(range(0, 32, 2)), "features.1.0": list(range(0, 64, 2))})
    full, small = tmp_path / "full.onnx", tmp_path / "small.onnx"
    export_checkpoint(ckpt, output=full)
    summary = export_checkpoint(ckpt, prune_channels=True, output=small)
    card = json.loads((tmp_path / "small.json").read_text())
    assert card["channels_kept"]["features.0.0"] == 16 and card["channels_kept"]["features.1.0"] == 32
    assert small.stat().st_size < 0.75 * full.stat().st_size
    assert summary["pruning"]["totals"]["channels_after"] < summary["pruning"]["totals"]["channels_before"]
    assert faithful(summary["verification"])
    assert summary["kernels"]["integer_mac_share"] == 1.0 and summary["kernels"]["float_conv_nodes"] == 0

    # --channel-multiple 16: every group keeps a multiple of 16 channels (zero ones round it up), still exact
    summary = export_checkpoint(ckpt, prune_channels=True, channel_multiple=16, output=tmp_path / "x16.onnx")
    kept = json.loads((tmp_path / "x16.json").read_text())["channels_kept"]
    assert kept["features.0.0"] == 16 and kept["features.1.0"] == 32  # already multiples: unchanged
    assert summary["pruning"]["channel_multiple"] == 16 and faithful(summary["verification"])
    with pytest.raises(UsageError, match="pass --prune-channels too"):
        export_checkpoint(ckpt, channel_multiple=16, output=tmp_path / "no.onnx")
    assert not (tmp_path / "no.onnx").exists()


def test_failed_verification_writes_nothing(ckpts, tmp_path, monkeypatch) -> None:
    import rcdeploy.export.qdq as qdq

    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    real = qdq.build_qdq

    def corrupted(*args, **kwargs):
        ex = real(*args, **kwargs)
        fc = next(n for n in ex.model.graph.node if n.op_type == "Gemm")
        w_dq = next(n for n in ex.model.graph.node if n.output[0] == fc.input[1])
        w = next(t for t in ex.model.graph.initializer if t.name == w_dq.input[0])
        arr = onnx.numpy_helper.to_array(w)
        w.CopyFrom(onnx.numpy_helper.from_array(np.roll(arr, 1, axis=0), w.name))  # classes swapped
        return ex

    monkeypatch.setattr(qdq, "build_qdq", corrupted)
    with pytest.raises(VerificationError, match="PyTorch"):
        export_checkpoint(ckpts["small_cnn-8"], formats="all", output=out)
    assert out.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no sidecar, no .ort, no temp files


def test_verify_onnx_rejects_a_different_model(ckpts, digits) -> None:
    model, _ = load_model(ckpts["small_cnn-8"])
    other, _ = load_model(ckpts["small_cnn-4"])
    ex = build_qdq(other, (1, 8, 8))
    with pytest.raises(VerificationError):
        verify_onnx(ex.to_bytes(), model, digits.val.x, digits.val.y)


def test_bad_inputs_are_usage_errors(ckpts, digits, tmp_path) -> None:
    with pytest.raises(UsageError, match="not found"):
        export_checkpoint(tmp_path / "missing.pt", output=tmp_path / "m.onnx")
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(os.urandom(256))
    with pytest.raises(UsageError, match="checkpoint"):
        export_checkpoint(foreign, output=tmp_path / "m.onnx")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(UsageError, match="not an rcdeploy checkpoint"):
        export_checkpoint(tmp_path / "plain.pt", output=tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="unknown export format"):
        export_checkpoint(ckpts["small_cnn-8"], formats=["tflite"], output=tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"\.onnx"):
        export_checkpoint(ckpts["small_cnn-8"], output=tmp_path / "m.bin")
    with pytest.raises(UsageError, match="above"):
        export_checkpoint(ckpts["small_cnn-4"], bits=8, output=tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="storage"):
        export_checkpoint(ckpts["small_cnn-4"], storage="int2", output=tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "plain.pt"]

    # 4-bit activations need Clip nodes in a QDQ graph: refused, pointing at QONNX.
    meta = digits.meta
    model = create_model("small_cnn", num_classes=10, in_chans=1, mean=meta.mean, std=meta.std,
                         quant=QuantSpec(bits=4, act_bits=4), input_size=8)
    calibrate_activations(model, [digits.train.x[:128]])
    with pytest.raises(UsageError, match="qonnx"):
        build_qdq(model.eval(), (1, 8, 8))


def test_preact_resnet_exports_to_integer_kernels(digits, tmp_path) -> None:
    """BN before conv (a float affine between DQ and Q) and raw conv outputs into adds (ConvInteger)."""
    ckpt = make_checkpoint(tmp_path / "m.pt", digits, "preact_resnet18", 8, width=0.25, steps=30)
    model, _ = load_model(ckpt)
    ex = build_qdq(model, (1, 8, 8))
    opt = ops_of(optimized_graph(ex.model))
    assert not FLOAT_CONV & set(opt), opt
    assert sum(opt[k] for k in INTEGER_CONV) == sum(layer.op == "conv" for layer in ex.layers) == 20
    assert opt["ConvInteger"] > 0 and len(ex.float_affine_ops) == 9
    x, y = torch.cat([digits.val.x, digits.test.x]), torch.cat([digits.val.y, digits.test.y])
    rep = verify_onnx(ex.to_bytes(), model, x, y, logit_step=ex.logit_step)
    assert faithful(rep)


def test_mobilenetv2_depthwise_exports_to_integer_kernels(digits) -> None:
    # Untrained (training 52 layers costs more than this test is worth): near-tied logits make top-1
    # meaningless, so the check is the mean logit difference against the logit spread.
    torch.manual_seed(0)
    meta = digits.meta
    model = create_model("mobilenetv2", num_classes=10, in_chans=1, mean=meta.mean, std=meta.std,
                         quant=QuantSpec(bits=8), input_size=8, width=0.25)
    _randomize_bn(model, torch.Generator().manual_seed(2))
    calibrate_activations(model, [digits.train.x[:128]])
    model.eval()
    ex = build_qdq(model, (1, 8, 8))
    opt = ops_of(optimized_graph(ex.model))
    assert not FLOAT_CONV & set(opt), opt
    assert opt["QLinearConv"] == sum(layer.op == "conv" for layer in ex.layers) == 52
    assert opt["QLinearAdd"] == ops_of(ex.model)["Add"] > 0
    rep = verify_onnx(ex.to_bytes(), model, digits.val.x, min_agreement=0.0)
    assert rep["mean_abs_logit_diff"] < 0.05 * rep["logit_range"]


@pytest.mark.parametrize("bits", [8, 4])
def test_resnet20_prune_channels_including_residual_coupled(bits, digits, tmp_path) -> None:
    """ResNet-20 with block-internal channels and a channel of a residual-coupled stage removed."""
    zero = {f"blocks.{b}.conv1.0": list(range(0, 8 if b < 3 else 16, 2)) for b in range(9)}
    zero["blocks.0.conv2.0"] = [1]  # the whole stage-0 group (stem + every conv2 of the stage) loses channel 1
    ckpt = make_checkpoint(tmp_path / "r.pt", digits, "resnet20", bits, width=0.5, steps=60, zero=zero)
    full, small = tmp_path / "full.onnx", tmp_path / "small.onnx"
    export_checkpoint(ckpt, output=full)
    summary = export_checkpoint(ckpt, prune_channels=True, output=small)
    kept = json.loads((tmp_path / "small.json").read_text())["channels_kept"]
    assert kept["blocks.0.conv1.0"] == 4 and kept["blocks.0.conv2.0"] == 7 and kept["stem.1.0"] == 7
    if bits == 4:  # rounded up to multiples of 8 at export: zero channels come back, the file stays exact
        x8 = export_checkpoint(ckpt, prune_channels=True, channel_multiple=8, output=tmp_path / "x8.onnx")
        kept8 = json.loads((tmp_path / "x8.json").read_text())["channels_kept"]
        assert kept8["blocks.0.conv1.0"] == 8 and kept8["blocks.0.conv2.0"] == 8 and kept8["stem.1.0"] == 8
        assert faithful(x8["verification"])
        assert summary["pruning"]["totals"]["macs_after"] < x8["pruning"]["totals"]["macs_after"]
    totals = summary["pruning"]["totals"]
    assert totals["macs_after"] < 0.8 * totals["macs_before"]
    assert small.stat().st_size < full.stat().st_size
    assert faithful(summary["verification"])
    assert summary["kernels"]["integer_mac_share"] == 1.0 and summary["kernels"]["float_conv_nodes"] == 0
