"""Lipschitz-guided per-layer bits (`train --bits auto --size-budget`): norms, allocation, end to end."""

from __future__ import annotations

import json
import math
import random

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from _cli import run_cli
from onnx import numpy_helper
from torch import nn

from rcdeploy.config import make_config
from rcdeploy.models import create_model
from rcdeploy.models.common import InputStem
from rcdeploy.quant.allocate import CANDIDATE_BITS, LayerOptions, allocate, dp_optimum, layer_bytes
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.lipschitz import (
    CLIP_RATIOS,
    conv_norm,
    folded_weight,
    linear_norm,
    measure,
    quantize_weight,
)
from rcdeploy.quant.spec import QuantSpec, layer_bits, weight_layers
from rcdeploy.train.auto_bits import requantize_layers
from rcdeploy.train.checkpoint import load_checkpoint
from rcdeploy.train.loop import fit

DIGITS = {"num_classes": 10, "in_chans": 1, "mean": [0.3], "std": [0.3], "input_size": 8}


# -- norms ---------------------------------------------------------------------------------------------

def _jacobian_norm(fn, shape) -> float:
    """Largest singular value of the explicit Jacobian of `fn` at a point (a linear map: anywhere)."""
    n = math.prod(shape)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), torch.zeros(n, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(jac, ord=2))


@pytest.mark.parametrize("geometry", [
    {"stride": 2, "padding": 1, "groups": 1, "in_ch": 3},
    {"stride": 2, "padding": 1, "groups": 2, "in_ch": 4},
    {"stride": 1, "padding": 0, "groups": 1, "in_ch": 3, "dilation": 2},
])
def test_power_iteration_norm_of_a_conv_equals_its_jacobians_largest_singular_value(geometry):
    g = dict(geometry)
    in_ch = g.pop("in_ch")
    torch.manual_seed(0)
    w = torch.randn(6, in_ch // g["groups"], 3, 3, dtype=torch.float64)
    shape = (in_ch, 6, 6)
    exact = _jacobian_norm(lambda v: F.conv2d(v, w, None, **g), shape)
    got = conv_norm(w, shape, **g)
    assert abs(got - exact) <= 0.01 * exact, (got, exact)
    # the geometry matters: the same kernel without stride and padding is a different map
    if g["stride"] == 2:
        plain = _jacobian_norm(lambda v: F.conv2d(v, w, None, groups=g["groups"]), shape)
        assert abs(plain - exact) > 0.02 * exact


def test_linear_norm_is_the_exact_largest_singular_value():
    torch.manual_seed(1)
    w = torch.randn(7, 5)
    assert linear_norm(w) == pytest.approx(float(torch.linalg.svdvals(w.double())[0]), rel=1e-12)


def test_batchnorm_fold_scales_the_norm_by_gamma_over_sigma():
    """Diagonal case: a 1x1 identity conv folded with BatchNorm has norm max |gamma / sigma|."""
    conv = qnn.QuantConv2d(3, 3, 1, bias=False)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        bn.weight.copy_(torch.tensor([0.5, -3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    w = folded_weight(conv, bn)
    expect = max(abs(0.5) / math.sqrt(1 + bn.eps), 3.0 / math.sqrt(4 + bn.eps), 1.0 / math.sqrt(0.25 + bn.eps))
    assert conv_norm(w, (3, 4, 4)) == pytest.approx(expect, rel=1e-4)


def test_quantize_weight_grid_is_narrow_range_per_channel():
    w = torch.tensor([[0.9, -0.3, 0.1], [2.0, 1.1, -0.9]])
    q = quantize_weight(w.double(), 2)  # ternary: {-1, 0, 1} * max|w| per row
    assert torch.allclose(q, torch.tensor([[0.9, 0.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64))
    for bits in (3, 4, 8):
        levels = (quantize_weight(w.double(), bits) / (w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)))
        assert torch.allclose(levels, levels.round(), atol=1e-9) and levels.round().abs().max() == 2 ** (bits - 1) - 1


def test_clipping_is_a_setting_and_can_win_at_low_bits():
    """A clip ratio c scales the grid to c * max|w|; measured per bits, the kept error is the least over c
    (never above the unclipped one), and at ternary some layer does better clipped."""
    w = torch.tensor([[1.0, 0.5, -0.2, 0.05]], dtype=torch.float64)
    assert torch.allclose(quantize_weight(w, 3, clip=0.6), torch.tensor([[0.6, 0.4, -0.2, 0.0]], dtype=torch.float64))
    torch.manual_seed(0)
    model = create_model("small_cnn", quant=QuantSpec(bits=8, first_last_bits=None), width=0.5, **DIGITS)
    calibrate_activations(model, [torch.rand(32, 1, 8, 8)])
    stats = measure(model, torch.rand(32, 1, 8, 8), (2, 4), clips=CLIP_RATIOS)
    for s in stats:
        assert all(s.errors[b] <= s.unclipped[b] and s.clips[b] in CLIP_RATIOS for b in (2, 4))
    assert any(s.clips[2] < 1.0 and s.errors[2] < 0.9 * s.unclipped[2] for s in stats)


def test_requantize_sets_bits_and_clipped_scales():
    torch.manual_seed(0)
    model = create_model("small_cnn", quant=QuantSpec(bits=8, first_last_bits=None), width=0.25, **DIGITS)
    calibrate_activations(model, [torch.rand(8, 1, 8, 8)])
    requantize_layers(model, {"features.1.0": (3, 0.7), "head.fc": (5, 1.0)})
    layers = dict(weight_layers(model))
    assert layer_bits(layers["features.1.0"]) == 3 and layer_bits(layers["head.fc"]) == 5
    for name, bits, clip in (("features.1.0", 3, 0.7), ("head.fc", 5, 1.0)):
        m = layers[name]
        expect = clip * m.weight.detach().abs().flatten(1).amax(1) / (2 ** (bits - 1) - 1)
        assert torch.allclose(m.quant_weight().scale.flatten(), expect, rtol=1e-5)


# -- the allocator ---------------------------------------------------------------------------------------

def _layers(seed: int, n: int = 6) -> list[LayerOptions]:
    """Layers of different sizes, errors ~ c * 2^-b with noise (as measured errors behave)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        weights, ch = rng.choice([72, 288, 2304, 4608, 18432]), rng.choice([8, 16, 32])
        c = rng.uniform(0.1, 10.0)
        out.append(LayerOptions(f"l{i}", weights, ch, {b: c * 2.0 ** -b * rng.uniform(0.8, 1.2) for b in CANDIDATE_BITS}))
    return out


def _one_option_raise(opt: LayerOptions, bits: int) -> int | None:
    """Bytes of raising a layer one option above `bits` (None at its top option)."""
    i = opt.bits.index(bits)
    return None if i == len(opt.bits) - 1 else opt.bytes(opt.bits[i + 1]) - opt.bytes(bits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_fits_the_budget_within_one_step_and_is_monotone(seed):
    """Within one step: budget - bytes < the bytes of raising the blocking layer (whose next raise in the
    allocator's order did not fit) by one bits option; hence also < the largest one-option raise of any
    layer below its top. Monotone: a larger budget never lowers a layer's bits."""
    layers = _layers(seed)
    lo = sum(o.bytes(o.bits[0]) for o in layers)
    hi = sum(o.bytes(o.bits[-1]) for o in layers)
    previous = None
    for budget in range(lo, hi + 200, max(1, (hi - lo) // 300)):
        a = allocate(layers, budget, dp=False)
        assert a.bytes == sum(o.bytes(a.bits[o.name]) for o in layers) <= budget
        raises = {o.name: _one_option_raise(o, a.bits[o.name]) for o in layers}
        if all(r is None for r in raises.values()):
            assert a.blocking is None and a.bytes == hi
        else:
            leftover = budget - a.bytes
            assert a.blocking is not None and leftover < a.blocking["bytes"] == raises[a.blocking["layer"]]
            assert leftover < max(r for r in raises.values() if r is not None)
        if previous is not None:
            assert all(a.bits[n] >= previous[n] for n in a.bits), (budget, previous, a.bits)
        previous = a.bits
    assert previous == {o.name: 8 for o in layers}


def test_allocation_is_close_to_the_exact_optimum():
    """The greedy is not the DP optimum, but near it (and the DP is a true lower bound on a 1-byte grid)."""
    layers = _layers(3, n=4)
    lo = sum(o.bytes(2) for o in layers)
    hi = sum(o.bytes(8) for o in layers)
    for budget in (lo + (hi - lo) // 4, lo + (hi - lo) // 2):
        a = allocate(layers, budget)
        exact = dp_optimum(layers, budget, grid_cells=budget)
        assert exact <= a.error + 1e-12 and a.error <= 1.25 * exact


def test_ten_times_the_amplification_gets_more_bits_than_uniform():
    """Identical layers, one with A 10x: at the bytes of uniform 4 bits it gets more than 4 bits, others not more."""
    e = {b: 2.0 ** -b for b in CANDIDATE_BITS}
    layers = [LayerOptions(f"l{i}", 2304, 16, {b: (10.0 if i == 2 else 1.0) * v for b, v in e.items()})
              for i in range(5)]
    budget = sum(o.bytes(4) for o in layers)
    a = allocate(layers, budget)
    assert a.bits["l2"] > 4 and all(a.bits[f"l{i}"] <= 4 for i in (0, 1, 3, 4)), a.bits
    flat = allocate([LayerOptions(o.name, o.weights, o.out_channels, e) for o in layers], budget)
    assert set(flat.bits.values()) == {4}  # the control: equal layers share the budget equally


class _Chain(nn.Module):
    """stem -> conv(1->8) -> 3 x conv(8->8) -> GAP -> fc, each conv with its BatchNorm and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        q = QuantSpec(bits=8, first_last_bits=None)
        self.stem = InputStem([0.3], [0.3], q)
        self.c1, self.c2, self.c3, self.c4 = q.conv(1, 8, 3), q.conv(8, 8, 3), q.conv(8, 8, 3), q.conv(8, 8, 3)
        self.b1, self.b2, self.b3, self.b4 = (nn.BatchNorm2d(8) for _ in range(4))
        self.r1, self.r2, self.r3, self.r4 = (q.relu() for _ in range(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = q.linear(8, 10)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(self.stem(x))))
        for c, b, r in ((self.c2, self.b2, self.r2), (self.c3, self.b3, self.r3), (self.c4, self.b4, self.r4)):
            x = r(b(c(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_measured_amplification_follows_a_later_layers_folded_weights():
    """Scaling c3's BatchNorm gamma by 10 makes c3's folded weights 10x: A(c1), A(c2) grow 10x, A(c3), A(c4)
    and A(fc) stay. With c2's measured errors weighted by that amplification, at the uniform-4-bit bytes c2
    gets more than 4 bits (and more than c4, its twin in size). (The errors themselves are taken from the
    unscaled model: the rescale also makes every later activation 10x, which would scale later errors too.)"""
    torch.manual_seed(0)
    model = _Chain()
    calibrate_activations(model, [torch.rand(32, 1, 8, 8) for _ in range(2)])
    x = torch.rand(64, 1, 8, 8)

    def allocated(stats, amp):
        opts = [LayerOptions(s.name, s.weights, s.out_channels, {b: amp[s.name] * e for b, e in s.errors.items()})
                for s in stats.values()]
        return allocate(opts, sum(o.bytes(4) for o in opts))

    before = {s.name: s for s in measure(model, x, CANDIDATE_BITS)}
    with torch.no_grad():
        model.b3.weight.mul_(10.0)
    after = {s.name: s for s in measure(model, x, CANDIDATE_BITS)}
    alloc_before = allocated(before, {n: s.amplification for n, s in before.items()})
    alloc_after = allocated(before, {n: s.amplification for n, s in after.items()})
    for name, ratio in (("c1", 10.0), ("c2", 10.0), ("c3", 1.0), ("c4", 1.0), ("fc", 1.0)):
        assert after[name].amplification == pytest.approx(ratio * before[name].amplification, rel=1e-3), name
    assert after["c3"].norm == pytest.approx(10.0 * before["c3"].norm, rel=1e-3)
    # the path-sum through GAP over the 8x8 map: A(c4) = ||fc|| / sqrt(64) (ReLU and quantizers count 1)
    assert before["c4"].amplification == pytest.approx(linear_norm(model.fc.weight) / 8.0, rel=1e-3)
    assert alloc_after.bits["c2"] > 4 and alloc_after.bits["c2"] > alloc_before.bits["c2"]
    assert alloc_after.bits["c2"] > alloc_after.bits["c4"], alloc_after.bits


def test_residual_blocks_sum_their_paths():
    """ResNet: a block's input sees (1 + L_branch) through an identity shortcut, so A before a block is
    A after it times (1 + L_conv1 * L_conv2)."""
    torch.manual_seed(0)
    model = create_model("resnet20", quant=QuantSpec(bits=8, first_last_bits=None), width=0.25, **DIGITS)
    calibrate_activations(model, [torch.rand(16, 1, 8, 8)])
    s = {x.name: x for x in measure(model, torch.rand(8, 1, 8, 8), (4,))}
    b1 = "blocks.1"  # identity shortcut (stride 1, same width)
    branch = s[f"{b1}.conv1.0"].norm * s[f"{b1}.conv2.0"].norm
    # blocks.0.conv2's error reaches blocks.1's input through quantizer, add and ReLU (each 1); blocks.1.conv2's
    # error enters at blocks.1's add, which is where blocks.1's output bound starts
    a_in = s["blocks.0.conv2.0"].amplification
    a_out = s[f"{b1}.conv2.0"].amplification
    assert a_in == pytest.approx(a_out * (1.0 + branch), rel=1e-6)
    assert a_in > a_out * branch * 1.01  # not a plain product of the layers in forward order


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_the_bound_holds_on_a_float_model(name):
    """With float weights and activations the network is piecewise linear, so quantizing one layer changes
    the logits by at most A_l times its own output change: the measured gain never exceeds the bound."""
    torch.manual_seed(0)
    model = create_model(name, quant=QuantSpec(bits="float", act_bits="float", first_last_bits=None),
                         width=0.5, **DIGITS).eval()
    with torch.no_grad():  # BatchNorm statistics away from the identity, so the fold matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 2.0)
                m.weight.uniform_(0.5, 1.5)
    stats = measure(model, torch.rand(32, 1, 8, 8), (4,))
    for s in stats:
        assert 0 < s.gain <= s.amplification * (1 + 1e-4), (s.name, s.gain, s.amplification)


# -- command line -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--size-budget", "20KB"], "--size-budget needs --bits auto"),
    (["--bits", "auto"], "needs --size-budget"),
    (["--bits", "auto", "--size-budget", "abc"], "is not a size"),
    (["--bits", "auto", "--size-budget", "1KB"], "below the smallest"),
    (["--bits", "auto", "--size-budget", "20KB", "--quant", "binary-relax"], "--quant qat"),
    (["--bits", "auto", "--size-budget", "20KB", "--auto-bits-amplification", "guess"], "bound or measured"),
])
def test_bad_auto_bits_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "runs"
    code, _, err = run_cli(["train", "--out", out, "--epochs", "1", "--threads", "1", "--train-samples", "64",
                            *args], capsys)
    assert code == 2 and err.startswith("error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (out.exists() and any(out.iterdir()))


# -- end to end on digits -----------------------------------------------------------------------------------

def _file_weight_ints(model: onnx.ModelProto, row: dict) -> np.ndarray:
    """The integer weights of one exported layer, read from the file (undoing the uint8 zero point or the
    int8 spread k the writer applies)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == row["onnx_node"])
    cur = producer[node.input[1]]
    while cur.input[0] not in inits:
        cur = producer[cur.input[0]]
    ints = numpy_helper.to_array(inits[cur.input[0]]).astype(np.int64)
    if row["storage"] == "uint8":
        return ints - 128
    if row["storage"] == "int8":
        return ints // row["weight_spread"]
    return ints  # packed int4: the spread is a separate Mul


def test_auto_bits_trains_exports_and_benches_on_digits(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("small_cnn", quant=QuantSpec(bits=4, first_last_bits=None), width=0.5, **DIGITS)
    budget = sum(layer_bytes(m.weight.numel(), m.weight.shape[0], 4) for _, m in weight_layers(model))
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", "--bits", "auto", "--size-budget", budget, "--width", 0.5, "--prune-channels", 0,
                            "--epochs", 1, "--auto-bits-epochs", 1, "--train-samples", 384, "--batch-size", 64,
                            "--steps", 2, "--threads", 1, "--out", runs, "--name", "auto"], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(runs / "auto" / "best.pt")
    rec = ckpt["bit_allocation"]
    assert rec["budget"] == budget and rec["bytes"] <= budget and rec["min_bytes"] < budget < rec["max_bytes"]
    assert set(rec["bits"].values()) <= set(CANDIDATE_BITS) and len(set(rec["bits"].values())) > 1  # mixed
    assert ckpt["model"]["quant"]["overrides"] == rec["bits"]
    assert rec["measured_on"]["split"] == "train" and rec["pretrain"]["epochs"] == 1
    for row in rec["layers"]:
        assert row["norm"] > 0 and row["amplification"] > 0 and set(row["errors"]) == {str(b) for b in CANDIDATE_BITS}
        assert row["clip"] == row["clips"][str(row["bits"])] and row["errors"][str(row["bits"])] <= (
            row["unclipped_errors"][str(row["bits"])])
        errs = [row["errors"][str(b)] for b in CANDIDATE_BITS]
        assert errs[0] > errs[-1] > 0  # 2 bits err more than 8 on the same activations

    onnx_path = tmp_path / "m.onnx"
    # a uniform --bits would leave every pinned layer as it is: refused, nothing written
    code, _, err = run_cli(["export", runs / "auto" / "best.pt", "-o", onnx_path, "--bits", 4], capsys)
    assert code == 2 and "chosen per layer" in err and not onnx_path.exists()
    code, _, err = run_cli(["export", runs / "auto" / "best.pt", "-o", onnx_path, "--json", tmp_path / "e.json"],
                           capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "e.json").read_text())
    ver = summary["verification"]
    assert ver["top1_agreement"] >= 0.995 and ver["within_tolerance"] >= 0.995
    assert summary["kernels"]["integer_mac_share"] == 1.0 and summary["kernels"]["float_conv_nodes"] == 0
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    assert card["bits"]["weights"] == rec["bits"]
    assert card["training"]["bit_allocation"]["layers"] == json.loads(json.dumps(rec["layers"]))
    file = onnx.load(str(onnx_path))
    for row in card["layers"]:
        bits = rec["bits"][row["name"]]
        top = int(np.abs(_file_weight_ints(file, row)).max())
        # the file's integers use the allocated width, and need it (all but ternary exceed the next width down)
        assert top <= 2 ** (bits - 1) - 1 and (bits == 2 or top > 2 ** (bits - 2) - 1), (row["name"], bits, top)
        assert row["storage"] == ("uint8" if bits == 8 else "int4" if bits <= 4 else "int8")

    code, _, err = run_cli(["bench", onnx_path, "--attack", "pgd5", "--samples", 100, "--no-latency",
                            "--json", tmp_path / "b.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["model"]["bits"]["weights"] == rec["bits"]
    acc = report["accuracy"]
    assert acc["samples"] == 100 and [r["name"] for r in acc["robust"]] == ["pgd5"] and acc["robust"][0]["within_eps"]
    assert acc["worst_case_acc_pct"] <= acc["clean_acc_pct"]


def test_auto_bits_run_resumes_exactly(tmp_path):
    """Interrupted in the fine-tune, resumed: same weights, same allocation record as an uninterrupted run.
    (With the measured gain in place of the bound: the record says so, and weighs errors by it.)"""
    settings = {"dataset": "digits", "model": "small_cnn", "width": 0.25, "bits": "auto", "size_budget": "4KB",
                "auto_bits_amplification": "measured",
                "auto_bits_epochs": 1, "epochs": 2, "train_samples": 192, "batch_size": 64, "steps": 1,
                "val_samples": 32, "val_attack": "pgd2", "prune_channels": 0.0, "threads": 1}
    full = fit(make_config(None, {**settings, "out": str(tmp_path / "a")}))
    cut = fit(make_config(None, {**settings, "out": str(tmp_path / "b")}), stop_at=(1, 1))
    assert cut.interrupted
    resumed = fit(None, resume=cut.run_dir)
    a, b = load_checkpoint(full.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert a["bit_allocation"]["bits"] == b["bit_allocation"]["bits"] == b["model"]["quant"]["overrides"]
    assert a["bit_allocation"]["bytes"] <= 4000 and a["bit_allocation"]["amplification"] == "measured"
    for row in a["bit_allocation"]["layers"]:
        assert row["measured_gain"] > 0 and row["amplified_errors"]["3"] == pytest.approx(
            row["measured_gain"] * row["errors"]["3"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_checkpoint_bits_rebuild_exactly(tmp_path):
    """The overrides in the model spec rebuild the allocated widths (what resume and export rely on)."""
    q = QuantSpec(bits=8, first_last_bits=None, overrides={"features.0.0": 8, "features.1.0": 3, "features.3.0": 5,
                                                           "head.fc": 2})
    model = create_model("small_cnn", quant=q, width=0.25, **DIGITS)
    assert {n: layer_bits(m) for n, m in weight_layers(model)} == q.overrides
