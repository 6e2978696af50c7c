"""Seed methods II: ATMC (global L0 budget + ADMM integer codebooks) and the mixed trade-off loss."""

from __future__ import annotations

import copy
import io
import json
import math
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from rcdeploy.export.sidecar import compression_figures, zip_bytes
from rcdeploy.models import create_model
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.codebook import fit_codebook, lloyd_1d, project_codebook
from rcdeploy.quant.spec import QuantSpec, weight_layers
from rcdeploy.train import objectives
from rcdeploy.train.atmc import ATMC, grid
from rcdeploy.train.objectives import AdvSettings, mixed, natural, pgd, pgd_examples
from rcdeploy.train.unstructured import global_topk_masks, project_global_topk, project_topk, sparsity_report
from tests._cli import run_cli

DIGITS = {"num_classes": 10, "in_chans": 1, "mean": [0.3], "std": [0.3], "input_size": 8}


def _model(bits: int | str = 8, width: float = 0.25, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("small_cnn", quant=QuantSpec(bits=bits, first_last_bits=None), width=width, **DIGITS)
    calibrate_activations(model, [torch.rand(16, 1, 8, 8) for _ in range(2)])
    return model


# -- the global L0 projection -------------------------------------------------------------------------------

def test_global_projection_keeps_the_k_largest_of_all_tensors():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(100, generator=g), 0.01 * torch.randn(40, 25, generator=g), 10 * torch.randn(5, 10, generator=g)]
    n = sum(w.numel() for w in ws)
    k = 115  # ceil(0.9 ... ): 10% of 1150
    flat = torch.cat([w.abs().flatten() for w in ws])
    want = set(torch.topk(flat, k).indices.tolist())
    projected = [w.clone() for w in ws]
    masks = project_global_topk(projected, 0.9)
    got = set(torch.cat([p.flatten() for p in projected]).nonzero().flatten().tolist())
    assert n == 1150 and got == want  # exactly the k largest |w| of all of them, wherever they live
    assert all(torch.equal(p, w.masked_fill(m, 0)) for p, w, m in zip(projected, ws, masks))
    assert int((projected[1] != 0).sum()) == 0 and int((projected[2] != 0).sum()) > 40  # scales decide
    per_layer = torch.cat([project_topk(w, 0.9).flatten() for w in ws])
    assert set(per_layer.nonzero().flatten().tolist()) != want  # a per-layer budget keeps other weights
    assert [m.shape for m in global_topk_masks(ws, 0.9)] == [w.shape for w in ws]


# -- the codebook Z-step --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, symmetric", [(1, True), (2, True), (4, True), (4, False), (3, False)])
def test_codebook_values_are_few_integer_multiples_of_the_channel_scale(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    scale = torch.tensor([1e-3, 0.02, 0.5, 3.0, 0.07, 1.0])  # channels of very different scales
    v = torch.randn(6, 4, 3, 3, generator=g) * scale.view(-1, 1, 1, 1) * 60
    support = torch.rand(v.shape, generator=g) > 0.3
    z = project_codebook(v, scale, bits, qmax=127, support=support, symmetric=symmetric)
    q = z / scale.view(-1, 1, 1, 1)
    assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= 127  # on the quantizer's grid
    nonzero = torch.unique(q.round()[q.round() != 0])
    assert 2 ** (bits - 1) < len(nonzero) <= 2 ** bits  # the budget, used
    assert not z[~support].any()  # the L0 support is kept
    # A BatchNorm fold flips the integer signs of some channels: a symmetric codebook maps onto itself.
    flipped = q.round() * torch.tensor([1, -1, 1, -1, -1, 1.0]).view(-1, 1, 1, 1)
    assert (len(torch.unique(flipped[flipped != 0])) <= 2 ** bits) or not symmetric


def test_lloyd_steps_never_raise_the_objective_and_the_float_codebook_is_free():
    g = torch.Generator().manual_seed(1)
    t, w = torch.randn(500, generator=g) * 20, torch.rand(500, generator=g) + 0.5
    costs = []
    for iters in (0, 1, 2, 20):
        _, fitted = lloyd_1d(t, w, 8, integer=True, lo=-127, hi=127, iters=iters)
        assert torch.equal(fitted, fitted.round())
        costs.append(float((w * (t - fitted) ** 2).sum()))
    assert costs == sorted(costs, reverse=True) and costs[-1] < costs[0]
    v = torch.randn(3, 50, generator=g)
    z = project_codebook(v, None, 2)
    assert 2 < len(torch.unique(z[z != 0])) <= 4 and not torch.equal(z, z.round())
    z2, centers = fit_codebook(v, None, 2, init=torch.unique(z[z != 0].abs()))
    assert torch.allclose(z2, z)  # warm start from its own result: the same codebook (a fixed point)


# -- ADMM in the trainer's hooks ---------------------------------------------------------------------------------

def test_atmc_dual_update_is_exact_and_projection_global():
    model = _model()
    sp = ATMC(model, target=0.8, codebook_bits=3, quant_interval=2)
    ws = sp.weights(model)
    total = sum(w.numel() for w in ws)
    assert sum(int((w != 0).sum()) for w in ws) == math.ceil(0.2 * total)  # the init projects too
    with torch.no_grad():
        for w in ws:
            w.add_(0.01 * torch.randn_like(w))  # a dense step, as SGD leaves it
    sp.after_step(model, 0.1)  # step 1: projection only
    assert sum(int((w != 0).sum()) for w in ws) == math.ceil(0.2 * total)
    u_old = [u.clone() for u in sp.u]
    with torch.no_grad():
        for w in ws:
            w.mul_(1.01)  # move W so the update is not trivial
    sp.after_step(model, 0.1)  # step 2: projection, then Z <- codebook(W + U), U <- U + W - Z
    w_now = [w.detach().clone() for w in ws]
    for u_new, u0, w, z in zip(sp.u, u_old, w_now, sp.z):
        assert torch.equal(u_new, u0 + w - z)
    for (name, layer), z in zip(weight_layers(model), sp.z):
        scale, qmax = grid(layer)
        q = z / scale.view((-1,) + (1,) * (z.dim() - 1))
        assert (q - q.round()).abs().max() < 1e-3 and len(torch.unique(q.round()[q.round() != 0])) <= 8, name
        assert not z[layer.weight == 0].any()
    pen = sp.penalty(model)
    assert pen is not None and float(pen.detach()) > 0
    sp.start_finetune(model)  # final phase: W = Z, scales held
    for w, z in zip(sp.weights(model), sp.z):
        assert torch.equal(w, z)
    for _, layer in weight_layers(model):
        assert len(torch.unique(layer.quant_weight().int()[layer.quant_weight().int() != 0])) <= 8
    assert sp.penalty(model) is None and sp.stats(model)["w_z_residual"] == 0.0
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)  # a checkpoint holds plain data: it loads with weights_only=True
    buf.seek(0)
    again = ATMC(_model(seed=1), target=0.5)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.finetuning and again.codebook_bits == 3 and again.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(again.z, sp.z))
    assert all(torch.equal(a, b) for a, b in zip(again.fixed_scales, sp.fixed_scales))


def test_sparsity_report_counts_zero_filters_on_float_and_quantized_weights():
    model = _model()
    conv = weight_layers(model)[1][1]
    with torch.no_grad():
        conv.weight[:3] = 0
    rep = sparsity_report(model)
    filters = sum(m.weight.shape[0] for _, m in weight_layers(model) if m.weight.dim() == 4)
    assert rep["paper_channel_sparsity"] == rep["quantized_channel_sparsity"] == 3 / filters


# -- the training attack and the mixed loss ------------------------------------------------------------------------

class _Blind(nn.Module):
    """Logits that ignore the image: every attack gradient is exactly zero, so only the random start moves x."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b.expand(len(x), 3) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_training_attack_random_start_is_real_and_inside_the_ball():
    x = torch.rand(64, 1, 8, 8) * 0.8 + 0.1
    y = torch.zeros(64, dtype=torch.long)
    s = AdvSettings(eps=0.1, steps=3, step_size=0.03, beta=0.0)
    x_adv = pgd_examples(_Blind(), x, y, s, torch.Generator().manual_seed(0))
    delta = x_adv - x
    assert delta.abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (delta != 0).float().mean() > 0.99  # ATMC's reference start is a no-op: delta would be 0
    assert 0.04 < float(delta.abs().mean()) < 0.06  # uniform in [-eps, eps]: mean |delta| = eps / 2


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


def test_mixed_loss_endpoints_and_the_hand_computed_mix(monkeypatch):
    x, y = _batch()
    base = _model(bits=4).train()
    s = AdvSettings(eps=0.1, steps=2, step_size=0.05, beta=0.0, alpha=1.0)

    def run(fn, alpha):
        m = copy.deepcopy(base)
        return fn(m, x, y, AdvSettings(**{**s.__dict__, "alpha": alpha}), torch.Generator().manual_seed(7))

    assert torch.equal(run(mixed, 1.0)[0], run(pgd, 1.0)[0])  # alpha 1 is PGD-AT, bit for bit
    m = copy.deepcopy(base)
    x_adv = pgd_examples(m, x, y, s, torch.Generator().manual_seed(7))
    hand = 0.3 * F.cross_entropy(m(x), y) + 0.7 * F.cross_entropy(m(x_adv), y)
    loss, logits = run(mixed, 0.7)
    assert torch.allclose(loss, hand, atol=1e-6) and logits.shape == (32, 10)
    m = copy.deepcopy(base)
    mixed(m, x, y, AdvSettings(**{**s.__dict__, "alpha": 0.7}), torch.Generator().manual_seed(7))[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, layer in weight_layers(m) for p in [layer.weight])

    def no_attack(*a, **k):
        raise AssertionError("alpha 0 must not attack")

    monkeypatch.setattr(objectives, "parse_attack", no_attack)
    calls = []
    m = copy.deepcopy(base)
    m.register_forward_hook(lambda *a: calls.append(1))
    loss0, _ = mixed(m, x, y, AdvSettings(**{**s.__dict__, "alpha": 0.0}), torch.Generator().manual_seed(7))
    assert len(calls) == 1  # one clean forward, nothing else
    assert torch.allclose(loss0, run(natural, 0.0)[0], atol=1e-6)
    with pytest.raises(Exception, match="alpha"):
        mixed(m, x, y, AdvSettings(**{**s.__dict__, "alpha": 1.5}), torch.Generator())


# -- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--sparsity", "atmc"], "--prune-weights"),
    (["--sparsity", "admm", "--prune-weights", "0.5", "--codebook-bits", "4"], "--codebook-bits"),
    (["--sparsity", "atmc", "--prune-weights", "0.5", "--bits", "binary"], "2 bits or more"),
    (["--adv", "mixed", "--alpha", "1.5"], "alpha"),
    (["--sparsity", "atmc", "--prune-weights", "0.5", "--codebook-bits", "9"], "--codebook-bits"),
    (["--sparsity", "atmc", "--prune-weights", "0.5", "--sparsity-param", "rho=1e-6"], "rho"),  # YAML: a string
])
def test_bad_atmc_and_mixed_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "runs"
    code, _, err = run_cli(["train", "--out", out, "--epochs", "1", "--threads", "1", "--prune-channels", "0",
                            *args], capsys)
    assert code == 2 and err.startswith("error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (out.exists() and any(out.iterdir()))


# -- end to end: ATMC (b = 4, density 10%) on digits: train, export, bench -------------------------------------------

def _file_weights(path) -> list[np.ndarray]:
    """Integer weights of every integer kernel in onnxruntime's optimized graph (independent of the sidecar's
    reading of the QDQ file): QLinearConv / QGemm weight minus its zero point."""
    from rcdeploy.runtime.session import optimized_graph

    g = optimized_graph(onnx.load(str(path))).graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.int64) for t in g.initializer}
    out = []
    for node in g.node:
        if node.op_type in ("QLinearConv", "QGemm"):
            w, zp = inits[node.input[3]], inits[node.input[5]]
            out.append(w - (zp.reshape((-1,) + (1,) * (w.ndim - 1)) if zp.size > 1 else zp))
    return out


def test_atmc_trains_exports_and_benches_on_digits(tmp_path, capsys):
    runs = tmp_path / "runs"
    # The recipe's flags spelled out, as scripts use them (the recipe adds rho 5, quant_interval 4, the schedule).
    code, _, err = run_cli(["train", "--config", "atmc-small_cnn-digits-short", "--bits", "8", "--sparsity", "atmc",
                            "--prune-weights", "0.9", "--codebook-bits", "4", "--adv", "mixed", "--alpha", "0.5",
                            "--out", runs, "--name", "atmc"], capsys)
    assert code == 0, err
    run = runs / "atmc"
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    sparse = [m["sparsity"] for m in lines if m["phase"] == "sparsify"]
    residuals = [s["w_z_residual"] for s in sparse]
    assert len(sparse) >= 4 and all(s["w_z_residual_updates"] for s in sparse)
    assert residuals[-1] < 0.8 * residuals[0], residuals  # ||W - Z|| / ||W| falls over the ADMM phase
    final = lines[-1]["sparsity"]
    assert lines[-1]["phase"] == "finetune" and final["w_z_residual"] == 0.0
    assert final["density"] <= 0.1 + 1e-3 and max(final["distinct_nonzero"].values()) <= 16
    assert "paper_channel_sparsity" in lines[-1]["paper_sparsity"]
    onnx_path = tmp_path / "atmc.onnx"
    code, out, err = run_cli(["export", run / "best.pt", "-o", onnx_path, "--json", "-"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["verification"]["top1_agreement"] >= 0.995
    assert summary["kernels"]["integer_mac_share"] == 1.0 and summary["kernels"]["float_conv_nodes"] == 0
    ws = _file_weights(onnx_path)
    assert len(ws) == 4
    for w in ws:
        assert len(np.unique(w[w != 0])) <= 16
    nnz, params = sum(int((w != 0).sum()) for w in ws), sum(w.size for w in ws)
    assert nnz <= 0.1 * params + 1
    card = json.loads(onnx_path.with_suffix(".json").read_text())["compression"]
    data = onnx_path.read_bytes()
    assert card["file_bytes"] == os.path.getsize(onnx_path) and card["zip_bytes"] == zip_bytes(data)
    assert card["nnz"] == nnz and card["params"] == params and card["max_distinct_nonzero"] <= 16
    assert card == json.loads(json.dumps(compression_figures(onnx.load_from_string(data), data)))
    assert card["value_bits"] <= 4 * nnz and card["zip_bytes"] < 0.5 * card["file_bytes"]
    code, out, err = run_cli(["bench", onnx_path, "--attack", "pgd5", "--samples", "100", "--batch-sizes", "1",
                              "--latency-seconds", "0.2", "--json", "-"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["latency"] and report["accuracy"]


# -- the benchmark table's ATMC row ------------------------------------------------------------------------------

def _compression_table():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compression_table.py"
    if not path.is_file():
        pytest.skip("benchmarks/compression_table.py is not in this checkout")
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("compression_table_under_test", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def test_table_atmc_row_trains_with_the_reference_admm_settings_and_retrains_when_they_change(tmp_path, monkeypatch):
    # rho 5 / Z-U every 4 batches held ResNet-20's weights at the codebook from the first steps: the 3-epoch
    # row ended at 1% PGD-20 (17% clean / 3% PGD-10 on validation before W = Z; rho 0.1: 28% / 17%).
    import argparse

    import rcdeploy

    table = _compression_table()
    args = argparse.Namespace(epochs=3, train_samples=2000, val_samples=100)
    train, _ = table.row_settings("atmc", args, 142336, 0.225)
    assert train["sparsity_params"] == {"rho": 0.1, "quant_interval": 10}
    assert train["sparsity"] == "atmc" and train["adv"] == "mixed" and train["alpha"] == 0.5
    # A finished row of other settings is not reused: its export and run are dropped and the row retrains.
    spec = {"row": "atmc", "train": train, "export": {}, "samples": 8}
    old = json.loads(json.dumps({**spec, "train": {**train, "sparsity_params": {"rho": 5.0, "quant_interval": 4}}}))
    (tmp_path / "runs" / "atmc").mkdir(parents=True)
    (tmp_path / "atmc.onnx").write_bytes(b"old")
    (tmp_path / "atmc.row.json").write_text(json.dumps({"row": "atmc", "spec": old}))

    class Retrained(Exception):
        pass

    def train_stub(**kw):
        assert kw["sparsity_params"] == {"rho": 0.1, "quant_interval": 10}
        raise Retrained

    monkeypatch.setattr(rcdeploy, "train", train_stub)
    with pytest.raises(Retrained):
        table.run_row("atmc", tmp_path, json.loads(json.dumps(spec)))
    assert not (tmp_path / "atmc.onnx").exists() and not (tmp_path / "runs" / "atmc").exists()
