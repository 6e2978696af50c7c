"""Structured sparsity methods: they reach the target share with exact zeros, on real data, and resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.export.shrink import shrink_model
from rcdeploy.models import create_model
from rcdeploy.names import CHANNELS
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec
from rcdeploy.train.sparsity import SPARSITY, create_sparsity

METHODS = SPARSITY.names(kind=CHANNELS)  # every channel method (weight methods: tests/test_seed_methods.py)
TARGET = 0.5
EPOCHS = 10
STEPS = 10  # per epoch
BATCH = 64


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def tiny_model(x_train: torch.Tensor, name: str = "small_cnn", bits: int = 4, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = kwargs or {"width": 0.5}
    model = create_model(name, num_classes=10, in_chans=1, mean=(0.3,), std=(0.4,),
                         quant=QuantSpec(bits=bits, act_bits=bits), input_size=8, **kwargs)
    calibrate_activations(model, [x_train[i * 64:(i + 1) * 64] for i in range(4)])
    return model


def train(model, sp, x, y, epochs: int = EPOCHS, lr: float = 0.05) -> list[float]:
    """The trainer's calling sequence; returns the removable share seen at the end of each epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    shares = []
    for epoch in range(epochs):
        if epoch == sp.finetune_epoch(epochs):
            sp.start_finetune(model)
        model.train()
        for i in range(STEPS):
            j = (epoch * STEPS + i) % (len(x) // BATCH)
            xb, yb = x[j * BATCH:(j + 1) * BATCH], y[j * BATCH:(j + 1) * BATCH]
            loss = F.cross_entropy(model(xb), yb)
            penalty = sp.penalty(model)
            if penalty is not None:
                loss = loss + penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.after_step(model, lr)
        sp.end_epoch(model, epoch, epochs)
        shares.append(sp.stats(model)["channel_sparsity"])
    return shares


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("method", METHODS)
def test_method_reaches_target_with_exact_zeros(method, digits):
    x, y, xt, yt = digits
    model = tiny_model(x)
    sp = create_sparsity(method, model, target=TARGET, epochs=EPOCHS, steps_per_epoch=STEPS)
    shares = train(model, sp, x, y)
    stats = sp.stats(model)
    assert stats["phase"] == "finetune" and abs(stats["channel_sparsity"] - TARGET) <= 0.05
    assert shares[-1] == stats["channel_sparsity"]
    assert set(stats["layers"]) == {g.label for g in sp.groups}
    # Every masked channel is exactly zero on every producer row and BN, after more optimizer steps.
    masked = 0
    for g, mask in zip(sp.groups, sp.masks):
        for t in g.all_params(model):
            assert (t[mask] == 0).all()
        assert torch.equal(~g.alive(model), mask)
        masked += int(mask.sum())
    assert masked == stats["channels_removable"]
    if method == "group-lasso":  # the searched strength had already zeroed channels along the ramp
        assert shares[sp.finetune_epoch(EPOCHS) - 1] >= 0.3
    # The trained model shrinks to half the channels and computes the same thing.
    small, report = shrink_model(model, input_shape=(1, 8, 8))
    assert report.channels_after == report.channels_before - masked
    small.eval()
    model.eval()
    with torch.no_grad():
        assert (small(xt) - model(xt)).abs().max().item() <= 1e-5
    # 100 steps, half the channels: group lasso zeroed them gradually (measured 0.96); the others prune
    # abruptly when the mask is fixed and have 30 steps to recover (measured 0.57-0.58; chance is 0.1).
    assert accuracy(model, xt, yt) > (0.85 if method == "group-lasso" else 0.3)


def test_rgsm_prox_keeps_groups_above_threshold_and_zeroes_the_rest(digits):
    x, *_ = digits
    model = tiny_model(x)
    sp = create_sparsity("rgsm", model, target=TARGET, epochs=EPOCHS)
    assert sp.threshold == pytest.approx(math.sqrt(2 * 1e-2 / 1.0))  # paper defaults
    g = sp.groups[1]
    bn = model.get_submodule(g.bns[0])
    with torch.no_grad():
        bn.weight[[2, 5]] = 0.05  # norm of (gamma, beta) below sqrt(2 * lambda1 / beta1) = 0.141
        bn.bias[[2, 5]] = 0.05
        bn.weight[7], bn.bias[7] = 0.2, 0.0  # above: kept
    sp.after_step(model, lr=0.05)  # u <- group-L0 prox of w
    penalty = sp.penalty(model)
    # beta/2 ||w - u||^2 is exactly the two sub-threshold channels' parameters (plus lambda2's group term)
    conv = model.get_submodule(g.producers[0].name)
    expected = 0.5 * (conv.weight[[2, 5]].pow(2).sum() + 4 * 0.05 ** 2)
    assert penalty.requires_grad and penalty.item() == pytest.approx(expected.item(), rel=0.05)
    sp.end_epoch(model, 0, EPOCHS)  # w <- u
    alive = g.alive(model)
    assert not alive[2] and not alive[5] and alive[7]
    assert (conv.weight[[2, 5]] == 0).all() and (bn.weight[[2, 5]] == 0).all()


def test_slimming_penalty_is_l1_on_bn_scales(digits):
    x, *_ = digits
    model = tiny_model(x)
    sp = create_sparsity("slimming", model, target=TARGET, strength=1e-3)
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sp.penalty(model).item() == pytest.approx(1e-3 * sum(w.abs().sum().item() for w in gammas), rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trips_through_a_weights_only_checkpoint(method, digits):
    x, y, *_ = digits
    model = tiny_model(x)
    sp = create_sparsity(method, model, target=TARGET, epochs=3)
    train(model, sp, x, y, epochs=3)  # finetune_epoch(3) == 2: the mask is fixed
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin_model = copy.deepcopy(model)
    twin = create_sparsity(method, twin_model, target=0.9)  # settings come back from the state
    twin.load_state_dict(state)
    _assert_same(twin.state_dict(), sp.state_dict())
    assert twin.stats(twin_model) == sp.stats(model)
    # Both go on identically.
    for m, s in ((model, sp), (twin_model, twin)):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
        s.after_step(m, 0.05)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_state_for_another_method_or_model_is_refused(digits):
    x, *_ = digits
    model = tiny_model(x)
    state = create_sparsity("slimming", model, target=TARGET).state_dict()
    with pytest.raises(UsageError, match="slimming"):
        create_sparsity("group-lasso", model, target=TARGET).load_state_dict(state)
    other = tiny_model(x, width=0.25)
    with pytest.raises(UsageError, match="channel groups"):
        create_sparsity("slimming", other, target=TARGET).load_state_dict(state)


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_mask_on_residual_groups_rounds_to_a_multiple_and_shrinks_exactly(digits):
    """ResNet-20: masks fixed by a method cover residual-coupled groups, kept counts are multiples of 4."""
    x, *_ = digits
    model = tiny_model(x, name="resnet20", bits=32, width=0.5)
    sp = create_sparsity("group-lasso", model, target=TARGET, channel_multiple=4)
    sp.start_finetune(model)
    total = sum(g.size for g in sp.groups)
    kept = [int((~m).sum()) for m in sp.masks]
    assert all(k % 4 == 0 or k == g.size for k, g in zip(kept, sp.groups))
    share = 1 - sum(kept) / total
    assert TARGET <= share <= TARGET + 4 * len(sp.groups) / total
    residual = [g for g in sp.groups if len(g.producers) > 1]
    assert residual and all(mask.any() for g, mask in zip(sp.groups, sp.masks) if g in residual)
    for g, mask in zip(sp.groups, sp.masks):
        assert torch.equal(~g.alive(model), mask)
    small, report = shrink_model(model, channel_multiple=4)
    assert report.channels_after == sum(kept)
    model.eval()
    small.eval()
    with torch.no_grad():
        assert (small(x[:64]) - model(x[:64])).abs().max().item() <= 1e-5


def test_registry_and_bad_settings(digits):
    x, *_ = digits
    model = tiny_model(x)
    assert set(METHODS) == {"group-lasso", "rgsm", "slimming"} and set(METHODS) < set(SPARSITY.names())
    with pytest.raises(UsageError, match="known: .*group-lasso.*rgsm.*slimming"):
        create_sparsity("lasso", model, target=TARGET)
    with pytest.raises(UsageError, match="no setting beta"):
        create_sparsity("slimming", model, target=TARGET, beta=1.0)
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        create_sparsity("slimming", model, target=1.5)
    assert create_sparsity("rgsm", model, target=TARGET, beta=None).beta == 1.0  # None: the default


def test_residual_stream_groups_are_not_ranked_lowest_on_preact_models(digits):
    """PreAct: the residual-stream groups' producers have no BN of their own, so their raw scores are conv
    rows (about 0.1) against BN gammas (about 1) everywhere else. Scaled per layer (the default), a fresh
    model's mask leaves them far above `min_keep`; the raw ranking ("none") cuts them to it."""
    x, *_ = digits
    model = tiny_model(x, name="preact_resnet20", width=0.5)
    for normalize, cut_to_floor in (("layer", False), ("none", True)):
        sp = create_sparsity("group-lasso", model, target=TARGET, normalize=normalize)
        masks = sp.fix_masks(sp.scores(model))
        streams = [(g, m) for g, m in zip(sp.groups, masks) if len(g.producers) > 1]
        assert len(streams) == 3  # one per stage
        kept = [int((~m).sum()) / g.size for g, m in streams]
        assert all(k <= 0.125 for k in kept) == cut_to_floor, (normalize, kept)
    with pytest.raises(UsageError, match="normalize"):
        create_sparsity("group-lasso", model, target=TARGET, normalize="max")


@pytest.mark.parametrize("name", ["preact_resnet20"])
def test_preact_model_keeps_its_accuracy_through_the_mask_fix_with_default_settings(name, tmp_path):
    """Issue 16: PreAct ResNet-20 at 50% channels on digits keeps >= 90% of its unpruned clean accuracy
    through the mask fix, with no hand-set min_keep (measured 91-97% over seeds 0-2 against 95-98%
    unpruned; the raw ranking of before, normalize=none, got 42-54%)."""
    import json

    from rcdeploy.config import make_config
    from rcdeploy.train.loop import fit

    def val_clean(prune: float) -> tuple[float, float]:
        cfg = make_config(None, {"dataset": "digits", "model": name, "width": 0.5, "bits": 4, "adv": "none",
                                 "epochs": 6, "batch_size": 128, "lr": 0.05, "val_samples": None, "threads": 1,
                                 "prune_channels": prune, "out": str(tmp_path / f"p{prune}")})
        lines = [json.loads(s) for s in (fit(cfg).run_dir / "metrics.jsonl").read_text().splitlines()]
        fixed = [m for m in lines if m["phase"] == "finetune"] if prune else lines[-1:]
        if prune:
            assert fixed and fixed[0]["sparsity"]["channel_sparsity"] == pytest.approx(prune, abs=0.02)
        return fixed[0]["val_clean_acc"], lines[-1]["val_clean_acc"]

    dense, _ = val_clean(0.0)
    first, last = val_clean(0.5)
    assert dense > 80
    assert first >= 0.9 * dense and last >= 0.9 * dense, (dense, first, last)
