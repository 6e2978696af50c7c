"""Seed methods I: EnResNet (noise, ensemble mean, EOT), Binary-Relax, RVSM / ADMM, and their composition."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rcdeploy.cli import main
from rcdeploy.config import make_config
from rcdeploy.errors import UsageError
from rcdeploy.models import create_model
from rcdeploy.models.enresnet import FeynmanKacNoise, is_stochastic, noise_disabled
from rcdeploy.quant.binary_relax import BinaryRelax, relaxed
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec, weight_layers
from rcdeploy.train.loop import evaluate, fit
from rcdeploy.train.sparsity import create_sparsity
from rcdeploy.train.unstructured import hard_threshold, magnitude_mask, project_topk, sparsity_report

DIGITS = {"num_classes": 10, "in_chans": 1, "mean": [0.3], "std": [0.3], "input_size": 8}


def _model(name: str = "small_cnn", bits: int | str = 4, seed: int = 0, overrides: dict | None = None,
           **kw) -> nn.Module:
    torch.manual_seed(seed)
    quant = QuantSpec(bits=bits, first_last_bits=None, overrides=overrides or {})
    model = create_model(name, quant=quant, **{**DIGITS, **kw})
    calibrate_activations(model, [torch.rand(16, 1, 8, 8) for _ in range(2)])
    return model.eval()


# -- Binary-Relax ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, "ternary", "binary"])
def test_binary_relax_endpoints_are_float_and_exact_quantization(bits):
    model = _model(bits=bits, width=0.25)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        exact = model(x)
    float_model = _model(bits="float", width=0.25)  # same seed: same float weights, BN, activation quantizers
    float_model.load_state_dict(model.state_dict(), strict=False)  # no weight-scale parameters to take
    with torch.no_grad():
        floating = float_model(x)
    assert not torch.allclose(exact, floating)

    br = BinaryRelax(model, epochs=10, lam=0.5, growth=2.0, exact_fraction=0.2)
    br.set_lambda(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(x), floating)  # lambda = 0: w_r = w, the float forward, bit for bit
        for _, layer in weight_layers(model):
            assert torch.equal(layer.quant_weight(), layer.weight)
        br.set_lambda(model, 1e12)
        assert torch.allclose(model(x), exact, atol=1e-4)  # lambda -> inf approaches Q(w) ...
        br.set_lambda(model, math.inf)
        assert torch.equal(model(x), exact)  # ... and the exact phase *is* the Brevitas model
        br.set_lambda(model, 1.0)
        _, layer = weight_layers(model)[1]
        br.remove()
        q = layer.quant_weight().value
        br.set_lambda(model, 1.0)
        assert torch.allclose(layer.quant_weight(), (layer.weight + q) / 2)
    br.remove()


def test_binary_relax_schedule_and_gradients():
    model = _model(width=0.25)
    br = BinaryRelax(model, epochs=10, lam=0.5, growth=2.0, exact_fraction=0.2, exact_lr=0.1)
    assert [br.lambda_at(e) for e in (0, 1, 7)] == [0.5, 1.0, 64.0]
    assert br.exact_start == 8 and br.lambda_at(8) == math.inf and br.lambda_at(9) == math.inf
    assert br.lr_factor(7) == 1.0 and br.lr_factor(8) == 0.1
    assert not br.eligible(7) and br.eligible(9)
    assert BinaryRelax(model, epochs=1, exact_fraction=0.2).exact_start == 0  # always one exact epoch
    assert relaxed(torch.ones(2), torch.zeros(2), math.inf).tolist() == [0.0, 0.0]
    br.start_epoch(model, 0)
    model.train()
    F.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.arange(8)).backward()
    _, layer = weight_layers(model)[1]
    scale = layer.weight_quant.tensor_quant.scaling_impl.value
    assert layer.weight.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0  # scales learn in phase 1 too
    br.remove()
    with pytest.raises(UsageError, match="quantized weights"):
        BinaryRelax(_model(bits="float", width=0.25), epochs=3)


# -- RVSM / ADMM ----------------------------------------------------------------------------------------

def test_rvsm_hard_threshold_is_sqrt_2_lambda_over_beta():
    lam, beta = 1e-6, 1e-2
    thr = math.sqrt(2 * lam / beta)
    w = torch.tensor([0.0, thr * 0.99, -thr * 0.99, thr * 1.01, -thr * 1.01, -1.0])
    assert hard_threshold(w, lam, beta).tolist() == [0.0, 0.0, 0.0, w[3].item(), w[4].item(), -1.0]

    model = _model(width=0.5)
    sp = create_sparsity("rvsm", model, target=0.0, beta=beta, lam=lam)
    ws = sp.weights(model)
    small = sum(int((w.abs() <= thr).sum()) for w in ws)
    expected = beta / 2 * sum(float((w.detach()[w.abs() <= thr] ** 2).sum()) for w in ws)
    assert small > 0 and float(sp.penalty(model).detach()) == pytest.approx(expected, rel=1e-5)
    sp.end_epoch(model, 0, 4)  # w <- u
    assert sum(int((w == 0).sum()) for w in ws) == small
    assert sparsity_report(model)["weight_sparsity"] == pytest.approx(small / sum(w.numel() for w in ws))


def test_admm_projection_keeps_largest_magnitudes_of_both_signs():
    w = torch.tensor([-5.0, 0.1, 3.0, -0.2, 0.05, -4.0])
    assert project_topk(w, 0.5).tolist() == [-5.0, 0.0, 3.0, 0.0, 0.0, -4.0]
    assert magnitude_mask(w, 0.5).tolist() == [False, True, False, True, True, False]

    model = _model(width=0.5)
    sp = create_sparsity("admm", model, target=0.75, rho=1e-2)
    assert float(sp.penalty(model)) > 0  # w is not yet sparse: it is pulled towards z
    sp.end_epoch(model, 0, 4)
    for z in sp.z:
        assert int((z == 0).sum()) >= 0.75 * z.numel() - 1
    sp.start_finetune(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    F.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.arange(8)).backward()
    opt.step()
    sp.after_step(model, 0.1)
    for w, mask in zip(sp.weights(model), sp.weight_masks):
        assert torch.all(w[mask] == 0) and int(mask.sum()) == w.numel() - math.ceil(0.25 * w.numel())
        assert torch.all(w.detach()[~mask] != 0)  # the kept weights moved with the step
    stats = sp.stats(model)
    assert stats["weight_sparsity"] >= 0.7 and 0 <= stats["paper_channel_sparsity"] <= 1
    with pytest.raises(UsageError, match="prune-weights"):
        create_sparsity("admm", model, target=0.0)


def test_unstructured_sparsity_trains_and_rejects_channel_targets(tmp_path):
    base = {"dataset": "digits", "model": "small_cnn", "width": 0.25, "adv": "none", "epochs": 2, "batch_size": 128,
            "train_samples": 256, "val_samples": 32, "val_attack": "fgsm", "threads": 1, "out": str(tmp_path / "r")}
    result = fit(make_config(None, {**base, "sparsity": "admm", "prune_weights": 0.6, "finetune_fraction": 0.5}))
    last = result.metrics[-1]["sparsity"]
    assert last["method"] == "admm" and last["phase"] == "finetune" and last["weight_sparsity"] >= 0.59
    with pytest.raises(UsageError, match="prune-weights"):
        fit(make_config(None, {**base, "sparsity": "rvsm", "prune_channels": 0.5}))


# -- EnResNet -------------------------------------------------------------------------------------------

def test_enresnet_noise_is_on_at_test_time_and_off_when_disabled():
    model = _model("en2resnet20", width=0.25)
    assert is_stochastic(model) and len(model.members) == 2
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.equal(a, b)
        with noise_disabled(model):
            assert not is_stochastic(model)
            assert torch.equal(model(x), model(x))
        assert is_stochastic(model)
    quiet = _model("en2resnet20", width=0.25, noise=0.0)
    assert not is_stochastic(quiet) and not any(isinstance(m, FeynmanKacNoise) for m in quiet.modules())
    baseline = _model("preact_resnet20", width=0.25)
    with torch.no_grad():
        assert torch.equal(baseline(x), baseline(x))


def test_noise_scale_is_a_tenth_of_each_images_std():
    torch.manual_seed(0)
    noise = FeynmanKacNoise(0.1)
    x = torch.randn(2, 16, 32, 32) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    drawn = (noise(x) - x).flatten(1)
    ratio = drawn.std(1) / x.flatten(1).std(1)
    assert torch.allclose(ratio, torch.full((2,), 0.1), rtol=0.05)
    assert drawn.mean(1).abs().max() < 0.01 * x.flatten(1).std(1).max()


@pytest.mark.parametrize("overrides", [None, {"members.*.head.fc": 8}])  # heads rebuilt after construction
def test_ensemble_mean_is_exact_and_head_gradients_follow_the_averaged_form(overrides):
    model = _model("en2resnet20", width=0.25, noise=0.0, overrides=overrides)
    model.train()
    feats: list[torch.Tensor] = []
    hooks = [m.head.fc.register_forward_hook(lambda _m, i, _o: feats.append(i[0].detach())) for m in model.members]
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    logits = model(x)
    for h in hooks:
        h.remove()
    member_logits = [m.head.fc(f) for m, f in zip(model.members, feats)]
    assert torch.allclose(logits, sum(member_logits), atol=1e-6)
    F.cross_entropy(logits, y).backward()
    g = (F.softmax(logits.detach(), 1) - F.one_hot(y, 10)) / len(y)
    n = 2
    for m, f in zip(model.members, feats):
        # grad of W/n under the averaged form is (1/n) * (dL/dW); hooks give exactly (1/n^2) * G^T f
        expected = g.T @ f / n ** 2
        assert torch.allclose(m.head.fc.weight.grad, expected, atol=1e-6)


class _Coin(nn.Module):
    """Real random classifier: class 0 wins with probability 1/2 per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.randn(x.shape[0], 1) + self.w + 0 * x.sum((1, 2, 3))[:, None]
        return torch.cat([r, -r], 1)


def test_eot_evaluation_averages_accuracy_over_draws():
    torch.manual_seed(0)
    x, y = torch.rand(200, 1, 8, 8), torch.zeros(200, dtype=torch.long)
    one = evaluate(_Coin(), x, y, "fgsm", 0.1, eot=1)
    many = evaluate(_Coin(), x, y, "fgsm", 0.1, eot=40)
    assert one["clean_acc"] * 2 == round(one["clean_acc"] * 2)  # one draw: multiples of 1/200
    assert abs(many["clean_acc"] - 50) < 2.5  # the mean of 8000 draws (std 0.56 points)
    assert abs(many["robust_acc"] - 50) < 2.5
    assert many["clean_acc"] * 2 != round(many["clean_acc"] * 2)  # finer than one draw can give
    det = _model(width=0.25)
    xd, yd = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    assert evaluate(det, xd, yd, "fgsm", 0.1, eot=3) == evaluate(det, xd, yd, "fgsm", 0.1, eot=1)


@pytest.mark.parametrize("args, needle", [
    (["--quant", "magic"], "unknown quantization method"),
    (["--quant", "binary-relax", "--bits", "float"], "needs quantized weights"),
    (["--sparsity-param", "lambda1"], "KEY=VALUE"),
    (["--sparsity", "rvsm", "--prune-channels", "0.5"], "--prune-weights"),
    (["--sparsity", "admm"], "--prune-weights"),
    (["--eot", "0"], "--eot"),
])
def test_bad_seed_method_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(out), "--epochs", "1", "--threads", "1", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (out.exists() and any(out.iterdir()))


# -- composition: EnResNet + 4 bits + Binary-Relax + TRADES + RGSM, then export -------------------------

def test_composition_trains_and_exports(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["train", "--model", "en2resnet20", "--width", "0.25", "--dataset", "digits", "--bits", "4",
            "--quant", "binary-relax", "--br-growth", "2", "--adv", "trades", "--beta", "3", "--steps", "1",
            "--sparsity", "rgsm", "--sparsity-param", "lambda1=0.05", "--prune-channels", "0.4",
            "--epochs", "2", "--batch-size", "64", "--train-samples", "192", "--eot", "2", "--threads", "1",
            "--out", str(out), "--name", "combo", "--json", str(tmp_path / "train.json")]
    main(argv)
    run = out / "combo"
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["binary-relax"]["phase"] for m in lines] == ["relaxed", "exact"]
    assert lines[0]["binary-relax"]["lambda"] == 1.0
    sp = lines[-1]["sparsity"]
    assert sp["method"] == "rgsm" and abs(sp["channel_sparsity"] - 0.4) < 0.05
    cfg = make_config(run / "config.yaml")
    assert cfg.sparsity_params == {"lambda1": 0.05} and cfg.beta == 3 and cfg.eot == 2
    assert (run / "best.pt").is_file()

    # With the noise kept (export's default), the shrunk ensemble's integer graph draws it in every block
    # (tests/test_export_noise.py verifies such files by distribution).
    # The integer graph of the noise-free, shrunk ensemble (what `export --no-noise --prune-channels`
    # writes): it runs in onnxruntime and its logits match PyTorch's within a few output steps.
    from rcdeploy.export.api import _shrink, _strip_noise
    from rcdeploy.export.qdq import build_qdq
    from rcdeploy.runtime.session import open_session, run_logits
    from rcdeploy.train.checkpoint import load_model

    model, _ = load_model(run / "best.pt")
    noisy, _ = _shrink(model, (1, 8, 8))
    assert sum(n.op_type == "RandomNormalLike" for n in build_qdq(noisy, (1, 8, 8)).model.graph.node) == 2 * 9
    model, removed = _strip_noise(model, noise=False)
    assert len(removed) == 2 * 9
    small, report = _shrink(model, (1, 8, 8))
    assert report["totals"]["channels_after"] < 0.7 * report["totals"]["channels_before"]
    ex = build_qdq(small, (1, 8, 8))
    assert not any(n.op_type.startswith("Random") for n in ex.model.graph.node)
    from rcdeploy.data import load_dataset

    x = load_dataset("digits").test.x[:200]
    got = torch.from_numpy(run_logits(open_session(ex.model), x.numpy()))
    with torch.no_grad():
        ref = small.eval()(x)
    assert (got - ref).abs().mean() <= 0.02 * ref.abs().max()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
