"""The deployed EnResNet keeps its defense: the integer graph draws the Feynman-Kac noise as trained.

One tiny noisy ensemble (en2resnet20 at width 0.25, a few dozen Adam steps on scikit-learn's digits,
two residual channels zeroed so that --prune-channels has something to remove) is exported with and
without its noise; the stochastic file is judged by distribution (EOT means over draws), run in
onnxruntime, the differentiable twin and bench --eot.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export import make_checkpoint

from rcdeploy.data import load_dataset
from rcdeploy.errors import VerificationError
from rcdeploy.export.api import export_model
from rcdeploy.export.shrink import shrink_model
from rcdeploy.export.verify import (
    EOT_DRAWS,
    check_distribution,
    compare_distributions,
    judge_distributions,
    noise_at_expectation,
    torch_draws,
)
from rcdeploy.models.enresnet import FeynmanKacNoise, noise_modules
from rcdeploy.runtime.session import open_session, optimized_graph, run_logits
from rcdeploy.train.checkpoint import load_model

NAME, WIDTH, BITS = "en2resnet20", 0.25, 4
ZERO = {"members.0.stem.0": [0, 2], "members.1.stem.0": [1]}  # residual channels of stage 1 (4 wide)
VERIFY = 192  # held-out images (the exact noise-off check); the distribution check takes them all (<= 256)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits) -> Path:
    """A trained noisy EnResNet checkpoint with channels zeroed the removable way (as channel sparsity does)."""
    path = tmp_path_factory.mktemp("noise") / "en.pt"
    return make_checkpoint(path, digits, NAME, BITS, width=WIDTH, steps=60, zero=ZERO)


@pytest.fixture(scope="module")
def noisy(ckpt, tmp_path_factory) -> tuple[Path, dict]:
    """The default export: noise kept, channels removed."""
    out = tmp_path_factory.mktemp("noisy") / "model.onnx"
    result = export_model(ckpt, prune_channels=True, output=out, verify_samples=VERIFY)
    return out, result.summary


@pytest.fixture(scope="module")
def models(ckpt) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The checkpoint's masked model, and its shrunk copy (the model the export verified against)."""
    model, _ = load_model(ckpt)
    small, _ = shrink_model(model, input_shape=(1, 8, 8))
    return model.eval(), small.eval()


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_noise_is_exported_and_verified_by_distribution(noisy, digits) -> None:
    path, summary = noisy
    proto = onnx.load(str(path))
    assert ops(proto)["RandomNormalLike"] == 2 * 9  # one per residual block of each member
    ver = summary["verification"]
    assert ver["mode"] == "stochastic" and ver["draws"] == EOT_DRAWS and ver["samples"] == VERIFY
    assert ver["noise_off"]["within_tolerance"] >= 0.995  # the exact rule, noise off on both sides
    # The figures the report quotes: EOT accuracy of PyTorch and onnxruntime, and the per-draw spread.
    print(f"\nEOT-mean accuracy over {ver['draws']} draws of {ver['samples']} images: torch "
          f"{ver['torch_accuracy']:.2%}, onnx {ver['onnx_accuracy']:.2%} (allowed gap {ver['accuracy_tolerance']:.2%});"
          f" spread ratio {ver['spread_ratio']:.3f}; noise off: max |diff| {ver['noise_off']['max_abs_logit_diff']:.3g}"
          f" of range {ver['noise_off']['logit_range']:.3g}, accuracy {ver['noise_off']['onnx_accuracy']:.2%}")
    assert abs(ver["onnx_accuracy"] - ver["torch_accuracy"]) <= ver["accuracy_tolerance"]
    assert 0.8 <= ver["spread_ratio"] <= 1.25 and ver["torch_spread"] > 0
    # The integer kernels are still the integer kernels; the noise is float ops between them.
    kernels = summary["kernels"]
    assert kernels["integer_mac_share"] == 1.0 and kernels["float_conv_nodes"] == 0
    assert kernels["ops"].get("QLinearConv", 0) > 0 and kernels["ops"]["RandomNormalLike"] == 18
    assert kernels["int16_pairs"]["saturation_free"]
    # The card says the graph is stochastic, with which noise.
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["noise"]["stochastic"] and card["noise"]["coefficient"] == pytest.approx(0.1)
    assert card["noise"]["onnx_op"] == "RandomNormalLike" and card["verification"]["verification"]["mode"] == "stochastic"
    assert any("stochastic graph" in n for n in card["notes"])


def test_onnxruntime_draws_differ_and_average_to_the_torch_model(noisy, models, digits) -> None:
    path, summary = noisy
    session = open_session(onnx.load(str(path)), threads=1)
    x = digits.test.x[:64]
    a, b = run_logits(session, x.numpy()), run_logits(session, x.numpy())
    assert not np.array_equal(a, b)
    # EOT means: the shrunk model of the export (what was verified) and the file, 32 draws each.
    model, small = models
    got = np.stack([run_logits(session, x.numpy()) for _ in range(32)])
    ref = torch_draws(small, x, 32)
    report = compare_distributions(ref, got, digits.test.y[:64].numpy(), summary["verification"]["logit_step"])
    assert judge_distributions(report) is None, report
    assert np.abs(got.mean(0) - ref.mean(0)).mean() < 0.1 * np.abs(ref.mean(0)).max()
    # Channel removal kept the std's count: the shrunk model is the masked one in distribution.
    assert any(m.stat_channels for m in noise_modules(small))
    full = torch_draws(model, x, 32)
    assert judge_distributions(compare_distributions(full, ref, digits.test.y[:64].numpy())) is None


def test_a_wrong_noise_scale_fails_verification(noisy, models, digits) -> None:
    path, _ = noisy
    session = open_session(onnx.load(str(path)), threads=1)
    small = copy.deepcopy(models[1])
    for m in noise_modules(small):
        m.coeff *= 2
    x, y = digits.test.x[:128], digits.test.y[:128]
    with pytest.raises(VerificationError, match="spreads its logits"):
        check_distribution(lambda a: run_logits(session, a), small.eval(), x, y)


def test_noise_module_std_counts_removed_channels_as_zeros() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 4) + 0.5
    padded = torch.cat([x, torch.zeros(3, 2, 4, 4)], 1)
    noise = FeynmanKacNoise(0.1)
    torch.testing.assert_close(noise.std(padded), padded.flatten(1).std(1).view(-1, 1, 1, 1))
    noise.stat_channels = 8
    torch.testing.assert_close(noise.std(x), padded.flatten(1).std(1).view(-1, 1, 1, 1))


def test_noise_off_graph_and_twin(noisy, digits) -> None:
    from rcdeploy.deploy.twin import build_twin

    path, _ = noisy
    proto = onnx.load(str(path))
    x = digits.test.x[:32]
    quiet = noise_at_expectation(proto)
    assert not ops(quiet)["RandomNormalLike"]
    s = open_session(quiet, threads=1)
    assert np.array_equal(run_logits(s, x.numpy()), run_logits(s, x.numpy()))
    twin = build_twin(proto)
    with torch.no_grad():
        assert not torch.equal(twin(x), twin(x))  # the twin draws the noise too
        calm = build_twin(proto, noise=False)(x)
    assert (calm - torch.from_numpy(run_logits(s, x.numpy()))).abs().max() <= 0.05 * calm.abs().max()
    assert "QLinearConv" in ops(optimized_graph(proto))


def test_bench_eot_and_inspect_on_the_stochastic_file(noisy, capsys) -> None:
    from rcdeploy.cli import main
    from rcdeploy.deploy.bench import bench_model

    path, _ = noisy
    rep = bench_model(path, samples=48, attacks="fgsm", eot=3, latency=False, progress=False)
    assert rep["model"]["stochastic"] and rep["accuracy"]["evaluation_draws"] == 3
    assert len(rep["accuracy"]["clean_acc_draws_pct"]) == 3
    main(["inspect", str(path), "--json", "-"])
    out = capsys.readouterr().out
    assert "RandomNormalLike" in out


def test_no_noise_gives_a_deterministic_file(ckpt, digits, tmp_path) -> None:
    out = tmp_path / "quiet.onnx"
    summary = export_model(ckpt, output=out, verify_samples=VERIFY, noise=False).summary
    proto = onnx.load(str(out))
    assert not any(n.op_type.startswith("Random") for n in proto.graph.node)
    assert "mode" not in summary["verification"] and summary["verification"]["within_tolerance"] >= 0.995
    s = open_session(proto, threads=1)
    x = digits.test.x[:32].numpy()
    assert np.array_equal(run_logits(s, x), run_logits(s, x))
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["noise"]["stochastic"] is False and card["noise"]["removed"]
    assert any("noise injection removed" in n for n in card["notes"])
