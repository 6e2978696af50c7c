"""Seed methods III: CSTAR low rank. Tucker-2 projection, TuckerConv, the global rank allocator, ADMM in the
fit loop, the swap, resume across it, and the integer export of the factorized convs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rcdeploy.config import make_config
from rcdeploy.errors import UsageError
from rcdeploy.models.tucker import (
    FOLDED,
    LowRankLinear,
    TuckerConv,
    project,
    reconstruct,
    relative_residual,
    tucker2,
)
from rcdeploy.quant.spec import QuantSpec
from rcdeploy.train.loop import fit
from rcdeploy.train.lowrank import allocate, phase_epochs
from tests._cli import run_cli

FLOAT = QuantSpec(bits="float", act_bits="float", first_last_bits=None)


def _planted(co: int, ci: int, ranks: tuple[int, int], k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks[0], ranks[1], k, k, generator=g, dtype=torch.float64)
    uo = torch.randn(co, ranks[0], generator=g, dtype=torch.float64)
    ui = torch.randn(ci, ranks[1], generator=g, dtype=torch.float64)
    return reconstruct(core, uo, ui)  # non-orthogonal factors: exactly Tucker rank `ranks`, nothing more


# -- the projection ---------------------------------------------------------------------------------------

def test_planted_tucker_rank_is_recovered():
    w = _planted(16, 12, (3, 5))
    assert relative_residual(w, (3, 5)) < 1e-4
    assert relative_residual(w, (2, 5)) > 1e-2 and relative_residual(w, (3, 4)) > 1e-2  # less rank cannot
    core, uo, ui = tucker2(w, (3, 5))
    assert core.shape == (3, 5, 3, 3) and uo.shape == (16, 3) and ui.shape == (12, 5)
    assert torch.allclose(uo.T @ uo, torch.eye(3, dtype=uo.dtype), atol=1e-10)
    assert torch.allclose(ui.T @ ui, torch.eye(5, dtype=ui.dtype), atol=1e-10)


def test_projection_is_idempotent_and_its_error_never_rises_with_rank():
    w = torch.randn(12, 10, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = project(w, (4, 6))
    assert float((project(p, (4, 6)) - p).norm() / p.norm()) < 1e-10
    assert float((p - w).norm()) > 0.1 * float(w.norm())  # a random tensor is not low rank
    errs = {(a, b): relative_residual(w, (a, b)) for a in range(1, 13, 2) for b in range(1, 11, 2)
            if a <= 9 * b and b <= 9 * a}  # Tucker-2: a mode's rank is at most the other's times k*k
    with pytest.raises(ValueError, match="kernel area"):
        project(w, (11, 1))
    for (a, b), e in errs.items():
        # HOOI finds the optimum up to local optima of ~1e-6 relative (seen at rank 1); a rank step must not lose more
        for nxt in ((a + 2, b), (a, b + 2)):
            if nxt in errs:
                assert errs[nxt] <= e + 1e-6, (a, b, nxt, e, errs[nxt])
    assert errs[(11, 9)] < errs[(1, 1)]
    assert relative_residual(w, (12, 10)) < 1e-12  # full ranks: nothing removed


def test_projection_matches_tensorly_partial_tucker():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    w = torch.randn(12, 10, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (core, factors), _ = partial_tucker(w.numpy(), rank=(4, 6), modes=(0, 1), init="svd", n_iter_max=100)
    ref = tl.tenalg.multi_mode_dot(core, factors, modes=(0, 1))
    ours = project(w, (4, 6)).numpy()
    assert abs(float(((ours - w.numpy()) ** 2).sum()) ** 0.5 - float(((ref - w.numpy()) ** 2).sum()) ** 0.5) < 1e-6


# -- the modules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["tucker", "folded", "folded-out"])
def test_tucker_conv_float_forward_equals_the_dense_conv_of_its_kernel(form):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 12, 3, 3, generator=g) / 108 ** 0.5  # a conv's scale (1 / sqrt(fan-in)): outputs ~ 1
    bias = torch.randn(16, generator=g)
    core, uo, ui = tucker2(w, (4, 6))
    tc = TuckerConv(FLOAT, 32, 12, 16, 3, (4, 6), stride=2, padding=1, bias=True, form=form).eval()
    tc.load_factors(core, uo, ui, bias)
    convs = [n for n, m in tc.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == {"tucker": ["first", "core", "last"], "folded": ["core", "last"], "folded-out": ["first", "core"]}[form]
    x = torch.randn(3, 12, 9, 9, generator=g)
    ref = F.conv2d(x, reconstruct(core, uo, ui).float(), bias, stride=2, padding=1)
    with torch.no_grad():
        out = tc(x)
    assert out.shape == ref.shape == (3, 16, 5, 5)
    assert (out - ref).abs().max() < 1e-5
    assert (tc.dense_weight() - reconstruct(core, uo, ui).float()).abs().max() < 1e-5


def test_one_by_one_conv_and_linear_factorize_by_svd():
    w = torch.randn(24, 16, 1, 1, generator=torch.Generator().manual_seed(4))
    core, uo, ui = tucker2(w, (5, 16))  # mode 1 whole: the truncated SVD
    u, s, vh = torch.linalg.svd(w[:, :, 0, 0].double())
    svd5 = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose(reconstruct(core, uo, ui)[:, :, 0, 0], svd5, atol=1e-10)
    tc = TuckerConv(FLOAT, 32, 16, 24, 1, (5, 16), stride=2, form=FOLDED).eval()
    tc.load_factors(core, uo, ui, None)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        assert (tc(x) - F.conv2d(x, svd5.float()[:, :, None, None], stride=2)).abs().max() < 1e-5
    lin = LowRankLinear(FLOAT, 32, 16, 24, 5).eval()
    lin.load_svd(w[:, :, 0, 0], torch.zeros(24))
    xl = torch.randn(4, 16)
    with torch.no_grad():
        assert (lin(xl) - xl @ svd5.float().T).abs().max() < 1e-5


# -- the allocator ------------------------------------------------------------------------------------------

def _layers(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum per layer, like trained weights; the 3x3 convs of a CIFAR ResNet-20 (after its stem)
    out = {}
    sizes = [(16, 16)] * 6 + [(32, 16)] + [(32, 32)] * 5 + [(64, 32)] + [(64, 64)] * 5
    for i, (co, ci) in enumerate(sizes):
        w = torch.randn(co, ci, 3, 3, generator=g)
        u, s, vh = torch.linalg.svd(w.reshape(co, -1), full_matrices=False)
        out[f"l{i}"] = ((u * s * torch.linspace(1, 0.05, len(s)) ** 2) @ vh).reshape(co, ci, 3, 3)
    return out


@pytest.mark.parametrize("ratio, multiple", [(4.0, 1), (8.0, 1), (16.0, 1), (8.0, 4), (16.0, 4)])
def test_allocator_hits_the_ratio_within_3_percent(ratio, multiple):
    """The greedy path is cut before the first step that would exceed the budget, so the ratio is met within
    one rank step of one layer: well under 3% of the budget for these sizes (not for toy-sized budgets)."""
    layers = _layers()
    alloc = allocate(layers, ratio, multiple)
    dense = sum(w.shape[0] * w[0].numel() + w.shape[0] for w in layers.values())
    assert alloc.dense_params == dense
    stored = sum(alloc.geometry[n].params(p.form, *p.ranks) for n, p in alloc.plans.items())
    assert stored == alloc.params <= dense / ratio  # never over the budget ...
    assert alloc.ratio <= ratio * 1.03  # ... and within 3% of it
    for n, p in alloc.plans.items():
        caps = alloc.geometry[n].caps()
        for r, cap in zip(p.ranks, caps):
            assert r == cap or r % multiple == 0


def test_allocator_gives_an_exactly_low_rank_layer_no_more_than_its_rank():
    layers = {**_layers(), "planted": _planted(64, 64, (3, 5)).float()}
    for multiple, expect in ((1, (3, 5)), (4, (4, 8))):
        plan = allocate(layers, 4.0, multiple).plans["planted"]
        assert plan.ranks[0] <= expect[0] and plan.ranks[1] <= expect[1], (multiple, plan)


def test_allocator_never_raises_a_rank_when_the_ratio_rises():
    layers = _layers(6)
    previous = None
    for ratio in (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0):
        ranks = {n: p.ranks for n, p in allocate(layers, ratio, 2).plans.items()}
        if previous is not None:
            for n, r in ranks.items():
                assert r[0] <= previous[n][0] and r[1] <= previous[n][1], (ratio, n, r, previous[n])
        previous = ranks
    assert any(p.form == FOLDED or p.form == "tucker" for p in allocate(layers, 24.0, 2).plans.values())
    with pytest.raises(UsageError, match="cannot be reached"):
        allocate(layers, 1000.0, 32)


def test_phase_epochs_keep_one_factorized_epoch():
    assert phase_epochs(10, 0.3, 0.7) == (3, 7)
    assert phase_epochs(1, 0.3, 0.7) == (0, 1)  # swap at the end of the only epoch
    assert phase_epochs(6, 0.0, 1.0) == (0, 6)


# -- training, export, bench --------------------------------------------------------------------------------

BASE = {"dataset": "digits", "model": "small_cnn", "width": 0.5, "bits": 4, "adv": "pgd", "steps": 2, "eps": 0.1,
        "batch_size": 64, "train_samples": 384, "val_samples": 64, "val_attack": "fgsm", "lr": 0.05,
        "threads": 1, "low_rank": "4x", "rank_rho": 0.1, "rank_admm_at": 0.2, "rank_swap_at": 0.8}


def test_cstar_end_to_end_on_digits(tmp_path, capsys):
    """4-bit PGD training with --low-rank 4x: the ADMM residual falls, the factorized layers run as
    QLinearConv kernels of the factor shapes, the export verifies, the parameters shrink 4x, bench runs."""
    out = tmp_path / "runs"
    recipe = tmp_path / "cstar.yaml"
    # 5 epochs: 1 dense, 3 ADMM (the swap at the end of the third), 1 factorized
    recipe.write_text("rank_admm_at: 0.2\nrank_swap_at: 0.8\nval_samples: 64\n")
    code, _, err = run_cli(["train", "--config", recipe, "--low-rank", "4x", "--rank-rho", "0.1", "--bits", "4",
                            "--adv", "pgd", "--steps", "2", "--eps", "0.1", "--width", "0.5", "--epochs", "5",
                            "--batch-size", "64", "--lr", "0.05", "--train-samples", "384",
                            "--val-attack", "fgsm", "--out", out, "--name", "lr", "--threads", "1"], capsys)
    assert code == 0, err
    run = out / "lr"
    cfg = make_config(run / "config.yaml")
    assert cfg.low_rank == 4.0 and cfg.rank_rho == 0.1 and str(cfg.bits) == "4"
    lines = [json.loads(s)["low-rank"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in lines] == ["dense", "admm", "admm", "factorized", "factorized"]
    residuals = [lines[1]["residual"], lines[2]["residual"], lines[3]["residual_at_swap"]]
    # W moves towards its projection during ADMM; by 0.07 here, where training alone (rho 0) moves it by 0.002
    assert residuals[0] > residuals[1] > residuals[2] and residuals[2] < residuals[0] - 0.03, residuals
    assert 4.0 <= lines[-1]["ratio"] < 4.4  # never over the budget; one rank step is ~6% of this toy budget

    from rcdeploy.export.api import export_checkpoint

    summary = export_checkpoint(run / "best.pt", output=tmp_path / "m.onnx")
    assert summary["verification"]["top1_agreement"] >= 0.99
    card = json.loads((tmp_path / "m.json").read_text())
    structure = card["model"]["kwargs"]["low_rank"]["layers"]
    factorized = {n: d for n, d in structure.items() if d["form"] != "dense"}
    assert factorized and card["low_rank"]["layers"].keys() == structure.keys()

    # onnxruntime's optimized graph: each factorized layer is QLinearConv kernels of the factor shapes
    from rcdeploy.models import create_model
    from rcdeploy.runtime.session import optimized_graph

    graph = optimized_graph((tmp_path / "m.onnx").read_bytes()).graph
    inits = {t.name: list(t.dims) for t in graph.initializer}
    shapes = {n.name.split("_token")[0]: inits.get(n.input[3]) for n in graph.node if n.op_type == "QLinearConv"}
    dense_model = create_model(card["model"]["name"], quant=QuantSpec.from_dict(card["model"]["quant"]),
                               **{k: v for k, v in card["model"]["kwargs"].items() if k != "low_rank"})
    dense_params = 0
    for name, d in structure.items():
        layer = dense_model.get_submodule(name)
        co, ci, kh, kw = layer.weight.shape
        dense_params += layer.weight.numel() + co
        ro, ri = d["ranks"]
        if d["form"] == "tucker":
            want = {f"{name}.first": [ri, ci, 1, 1], f"{name}.core": [ro, ri, kh, kw], f"{name}.last": [co, ro, 1, 1]}
        elif d["form"] == "folded-out":
            want = {f"{name}.first": [ri, ci, 1, 1], f"{name}.core": [co, ri, kh, kw]}
        elif d["form"] == "folded":
            want = {f"{name}.core": [ro, ci, kh, kw], f"{name}.last": [co, ro, 1, 1]}
        else:
            want = {name: [co, ci, kh, kw]}
        for node, shape in want.items():
            assert shapes.get(node) == shape, (node, shapes)
    rows = {r["name"]: r["params"] for r in card["layers"]}
    stored = sum(p for r, p in rows.items() if any(r == n or r.startswith(f"{n}.") for n in structure))
    assert stored <= dense_params / 4 * 1.03, (stored, dense_params)
    assert card["low_rank"]["params"] == stored and card["low_rank"]["dense_params"] == dense_params
    assert card["low_rank"]["macs"] < card["low_rank"]["dense_macs"]

    code, _, err = run_cli(["bench", tmp_path / "m.onnx", "--attack", "fgsm", "--samples", "64", "--no-latency",
                            "--json", tmp_path / "b.json"], capsys)
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "b.json").read_text())["accuracy"]["clean_acc_pct"] <= 100


def same_run(whole, resumed, tmp_path) -> tuple[dict, dict]:
    """The resumed run (folder b) ended exactly where the whole run (folder a) did: the same metrics (but
    speed) and bit-identical weights. Returns both last.pt checkpoints."""
    def strip(metrics):
        return [{k: v for k, v in m.items() if k not in ("img_per_s", "train_time_s")} for m in metrics]

    assert strip(resumed.metrics) == strip(whole.metrics)
    a = torch.load(tmp_path / "a" / "r" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "r" / "last.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    return a, b


def test_resume_across_the_admm_phase_and_the_swap_is_exact(tmp_path):
    base = {**BASE, "width": 0.25, "adv": "none", "epochs": 4, "train_samples": 192, "val_samples": 32,
            "rank_admm_at": 0.0, "rank_swap_at": 0.75, "low_rank": 3}
    whole = fit(make_config(None, {**base, "out": str(tmp_path / "a"), "name": "r"}))
    stopped = fit(make_config(None, {**base, "out": str(tmp_path / "b"), "name": "r"}), stop_at=(1, 1))
    assert stopped.interrupted
    stopped = fit(None, resume=tmp_path / "b" / "r", stop_at=(2, 2))  # the epoch that ends with the swap
    assert stopped.interrupted
    a, b = same_run(whole, fit(None, resume=tmp_path / "b" / "r"), tmp_path)
    assert a["model"]["kwargs"]["low_rank"] == b["model"]["kwargs"]["low_rank"]
    assert any(k.endswith(".last.weight") for k in a["state_dict"])


def test_resume_after_the_swap_with_channel_sparsity_is_exact(tmp_path):
    """The sparsity state saved after the swap holds the factorized model's channel groups; a resumed run
    rebuilds the same groups from the checkpoint's model spec and ends bit for bit where the whole run does."""
    base = {**BASE, "width": 0.25, "adv": "none", "epochs": 4, "train_samples": 192, "val_samples": 32,
            "rank_admm_at": 0.25, "rank_swap_at": 0.75, "low_rank": 2, "prune_channels": 0.5}
    whole = fit(make_config(None, {**base, "out": str(tmp_path / "a"), "name": "r"}))
    stopped = fit(make_config(None, {**base, "out": str(tmp_path / "b"), "name": "r"}), stop_at=(3, 1))
    assert stopped.interrupted
    a, b = same_run(whole, fit(None, resume=tmp_path / "b" / "r"), tmp_path)
    assert any(k.endswith(".core.weight") for k in a["state_dict"])
    assert a["sparsity_state"]["group_sizes"] == b["sparsity_state"]["group_sizes"]


@pytest.mark.parametrize("args, needle", [
    (["--low-rank", "1x", "--prune-channels", "0"], "above 1"),
    (["--low-rank", "lots", "--prune-channels", "0"], "compression ratio"),
    (["--low-rank", "4x", "--sparsity", "rvsm", "--prune-weights", "0.5", "--prune-channels", "0"], "weight sparsity"),
    (["--low-rank", "4x", "--prune-channels", "0", "--quant", "binary-relax"], "binary-relax"),
])
def test_bad_low_rank_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "runs"
    code, _, err = run_cli(["train", "--out", out, "--epochs", "1", "--threads", "1", *args], capsys)
    assert code == 2 and err.startswith("error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (out.exists() and any(out.iterdir()))


def test_low_rank_with_channel_sparsity_refuses_a_schedule_it_cannot_keep(tmp_path):
    with pytest.raises(UsageError, match="finetune_fraction does not apply"):
        make_config(None, {**BASE, "prune_channels": 0.5, "finetune_fraction": 0.5})
    cfg = make_config(None, {**BASE, "prune_channels": 0.5, "rank_admm_at": 0.0, "epochs": 3,
                             "out": str(tmp_path / "r"), "name": "x"})
    with pytest.raises(UsageError, match="sparse epoch before the ADMM phase"):
        fit(cfg)
    assert not (tmp_path / "r" / "x").exists()


def test_low_rank_composes_with_channel_sparsity_and_the_export_removes_pruned_channels(tmp_path):
    """--prune-channels 0.5 --low-rank 2x: the mask is fixed when the ADMM phase starts, ranks are chosen for
    the channels that remain (2x of their dense parameters), pruned channels stay zero through the swap and
    the fine-tune, and export --prune-channels removes them from the factors' integer kernels."""
    from rcdeploy.export.api import export_checkpoint

    # ResNet-20: its strided 1x1 shortcuts are matrices (SVD) whose pruned input columns must stay whole
    cfg = {**BASE, "model": "resnet20", "width": 0.25, "train_samples": 256, "low_rank": 2, "prune_channels": 0.5,
           "epochs": 5, "out": str(tmp_path / "r"), "name": "x"}
    result = fit(make_config(None, cfg))
    phases = [(m["phase"], m["low-rank"]["phase"]) for m in result.metrics]
    assert phases == [("sparsify", "dense"), ("finetune", "admm"), ("finetune", "admm"),
                      ("finetune", "factorized"), ("finetune", "factorized")]
    removed = [m["sparsity"]["channels_removable"] for m in result.metrics]
    assert removed[1] >= 0.45 * result.metrics[1]["sparsity"]["channels_prunable"]
    assert removed[1:] == [removed[1]] * 4  # the pruned channels stay pruned through the swap
    lr = result.metrics[-1]["low-rank"]
    assert 2.0 <= lr["ratio"] < 2.2  # of the remaining channels' dense parameters, not of the unpruned model's

    summary = export_checkpoint(tmp_path / "r" / "x" / "best.pt", output=tmp_path / "m.onnx", prune_channels=True)
    assert summary["verification"]["within_tolerance"] >= 0.995
    card = json.loads((tmp_path / "m.json").read_text())
    rows = {r["name"]: r for r in card["layers"]}
    stored = remaining_dense = 0
    for name, d in card["model"]["kwargs"]["low_rank"]["layers"].items():
        parts = [rows[n] for n in (name, f"{name}.first", f"{name}.core", f"{name}.last") if n in rows]
        co, ci = parts[-1]["out_channels"], parts[0]["in_channels"]  # what remains after the shrink
        kh, kw = (rows.get(f"{name}.core") or rows[name])["kernel"]
        remaining_dense += co * ci * kh * kw + co
        stored += sum(p["params"] for p in parts)
        assert d["ranks"][0] <= co and (d["form"] != "tucker" or d["ranks"][1] <= ci)
    assert stored <= remaining_dense / 2 * 1.03, (stored, remaining_dense)
    assert card["low_rank"]["params"] == stored
    assert sum(r["params"] for r in card["layers"]) < 0.5 * card["low_rank"]["dense_params"]


def test_every_factorized_form_exports_as_qlinearconv_and_prunes_zeroed_rank_channels():
    """Three convs (Tucker-2), two convs (folded, and the SVD of a strided 1x1 shortcut) in the integer
    graph onnxruntime runs; a rank channel zeroed in training is removed by `--prune-channels`' shrink."""
    from rcdeploy.export.api import _shrink
    from rcdeploy.export.qdq import build_qdq
    from rcdeploy.export.verify import verify_onnx
    from rcdeploy.models import create_model
    from rcdeploy.quant.calibrate import calibrate_activations
    from rcdeploy.runtime.session import optimized_graph

    structure = {"layers": {"blocks.6.conv2.0": {"form": "tucker", "ranks": [4, 6]},
                            "blocks.3.conv1.0": {"form": "folded", "ranks": [3, 4]},
                            "blocks.7.conv1.0": {"form": "folded-out", "ranks": [16, 5]},
                            "blocks.6.shortcut.0": {"form": "folded", "ranks": [3, 8]}}}
    torch.manual_seed(0)
    model = create_model("resnet20", quant=QuantSpec(bits=4), num_classes=10, in_chans=1, mean=[0.3], std=[0.3],
                         input_size=8, width=0.25, low_rank=structure)
    with torch.no_grad():
        model.get_submodule("blocks.6.conv2.0.core").weight[1] = 0  # rank channel 1 of Ro: zero in, zero out
    calibrate_activations(model, [torch.rand(32, 1, 8, 8) for _ in range(4)])
    model.eval()
    want = {"blocks.6.conv2.0.first": [6, 16, 1, 1], "blocks.6.conv2.0.core": [4, 6, 3, 3],
            "blocks.6.conv2.0.last": [16, 4, 1, 1], "blocks.3.conv1.0.core": [3, 4, 3, 3],
            "blocks.3.conv1.0.last": [8, 3, 1, 1], "blocks.6.shortcut.0.core": [3, 8, 1, 1],
            "blocks.6.shortcut.0.last": [16, 3, 1, 1], "blocks.7.conv1.0.first": [5, 16, 1, 1],
            "blocks.7.conv1.0.core": [16, 5, 3, 3]}
    x = torch.rand(128, 1, 8, 8)
    for m, shapes in ((model, want), (_shrink(model, (1, 8, 8))[0],
                                      {**want, "blocks.6.conv2.0.core": [3, 6, 3, 3],
                                       "blocks.6.conv2.0.last": [16, 3, 1, 1]})):
        ex = build_qdq(m, (1, 8, 8))
        graph = optimized_graph(ex.model).graph
        inits = {t.name: list(t.dims) for t in graph.initializer}
        got = {n.name.split("_token")[0]: inits.get(n.input[3]) for n in graph.node if n.op_type == "QLinearConv"}
        assert {k: got.get(k) for k in shapes} == shapes
        assert not any(n.op_type in ("Conv", "ConvInteger") for n in graph.node)
        report = verify_onnx(ex.model, m, x, logit_step=ex.logit_step)  # the export's own check; raises
        assert report["within_tolerance"] == 1.0 and report["max_abs_logit_diff_steps"] <= report["tolerance_steps"]


@pytest.mark.parametrize("model, adv", [("small_cnn", "fgsm-rs"), ("small_cnn", "trades"),
                                        pytest.param("en2resnet20", "pgd", marks=pytest.mark.slow)])  # ~25-60 s
def test_low_rank_composes_with_every_objective_and_ensemble_members(tmp_path, model, adv):
    from rcdeploy.models.tucker import TuckerConv
    from rcdeploy.train.checkpoint import load_model

    cfg = {**BASE, "model": model, "adv": adv, "steps": 1, "width": 0.25, "epochs": 2, "train_samples": 128,
           "val_samples": 32, "rank_admm_at": 0.0, "rank_swap_at": 0.5, "low_rank": 2, "beta": 3.0,
           "out": str(tmp_path / "r"), "name": "x"}
    result = fit(make_config(None, cfg))
    assert [m["low-rank"]["phase"] for m in result.metrics] == ["factorized", "factorized"]
    assert result.best is not None and result.best["epoch"] >= 1
    loaded, _ = load_model(tmp_path / "r" / "x" / "best.pt")
    owners = {n.split(".")[1] if n.startswith("members.") else "" for n, m in loaded.named_modules()
              if isinstance(m, TuckerConv)}
    assert owners == ({"0", "1"} if model.startswith("en") else {""})  # every ensemble member is factorized
