"""Attacks: registry-wide invariants, known answers on linear models, Square against onnxruntime, EOT."""

from __future__ import annotations

import math

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

from rcdeploy.attacks import (
    ATTACKS,
    CW,
    FGSM,
    IFGSM,
    PGD,
    Square,
    attack_names,
    margin,
    parse_attack,
    parse_attacks,
)
from rcdeploy.errors import UsageError

EPS = 0.1  # digits pixels are 0..16 / 16; at 0.1 an undefended CNN loses about half its accuracy
# One spec per registry family, few steps: the invariants hold for any budget.
SPECS = ["fgsm", "ifgsm5", "pgd5", "cw5", "square40", "apgd-ce5", "apgd-t5", "fab-t5"]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spinning threads made this file 10-20x slower (measured); restored for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10)
    )


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [0, 1], shuffled once: 1200 train, 400 test."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:1600], y[1200:1600]


@pytest.fixture(scope="module")
def trained(digits) -> nn.Sequential:
    """A tiny float CNN trained full-batch, 300 Adam steps (~1 s on one core; test accuracy 0.97)."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    net = tiny_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(xtr), ytr).backward()
        opt.step()
    return net.eval()


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_trained_model_is_good(trained, digits) -> None:
    _, _, xte, yte = digits
    assert accuracy(trained, xte, yte) > 0.9


# -- invariants over the whole registry -------------------------------------------------------------
def test_specs_cover_the_registry() -> None:
    families = {parse_attack(s, eps=EPS).family for s in SPECS}
    assert families == set(ATTACKS.names())
    assert sorted(attack_names()) == ["apgd-ceN", "apgd-tN", "cwN", "fab-tN", "fgsm", "ifgsmN", "pgdN", "squareN"]


class ModeModel(nn.Module):
    """BatchNorm and dropout make train/eval visible; one frozen BN shows modes restored one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.frozen_bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_bn(self.body(x)))


@pytest.mark.parametrize("restarts", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS)
def test_invariants(spec: str, dtype: torch.dtype, restarts: int) -> None:
    torch.manual_seed(0)
    model = ModeModel().to(dtype)
    x = torch.rand(6, 1, 8, 8, dtype=dtype)
    x[0, 0, :2] = 0.0  # pixels on the [0, 1] edges: clamping must bind there
    x[1, 0, :2] = 1.0
    with torch.no_grad():  # labels the (eval) model gets right, so every attack has work to do
        y = model.eval()(x).argmax(1)

    model.train()
    model.frozen_bn.eval()  # a caller's deliberate choice the attack must not undo
    model.head[2].bias.requires_grad_(False)
    model.head[2].weight.grad = torch.full_like(model.head[2].weight, 3.0)  # a caller's pending grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x_adv = parse_attack(spec, eps=EPS, seed=0, restarts=restarts).attack(model, x, y)

    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv - x).abs().max().item() > EPS / 2  # it did move
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # params and BN running stats
    assert all(
        p.grad is None for n, p in model.named_parameters() if n != "head.2.weight"
    ), "attack left gradients on parameters"
    assert torch.equal(model.head[2].weight.grad, torch.full_like(model.head[2].weight, 3.0))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and model.body[1].training and model.head[1].training
    assert not model.frozen_bn.training


@pytest.mark.parametrize("spec", SPECS)
def test_eval_mode_model_stays_in_eval(spec: str, trained, digits) -> None:
    _, _, xte, yte = digits
    assert not trained.training
    parse_attack(spec, eps=EPS, seed=0).attack(trained, xte[:8], yte[:8])
    assert not any(m.training for m in trained.modules())
    assert all(p.requires_grad for p in trained.parameters())


ROBUST_SPECS = ["fgsm", "ifgsm10", "pgd10", "cw10", "square300"]


@pytest.mark.parametrize("spec", ROBUST_SPECS)
def test_robust_accuracy_below_clean(spec: str, trained, digits) -> None:
    _, _, xte, yte = digits
    clean = accuracy(trained, xte, yte)
    robust = accuracy(trained, parse_attack(spec, eps=EPS, seed=0).attack(trained, xte, yte), yte)
    # Measured (torch 2.13 CPU): clean 0.97; fgsm 0.34, ifgsm10 0.28, pgd10 0.30, cw10 0.30, square300 0.31.
    assert robust <= min(clean - 0.4, 0.5), (spec, clean, robust)


# -- known answers on linear models -------------------------------------------------------------------
def linear_two_class(seed: int = 0) -> nn.Sequential:
    """Affine 2-class model with small weights, so softmax never saturates (gradients never vanish)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        model[1].weight.normal_(0, 0.05)
        model[1].bias.zero_()
    return model


def analytic_optimum(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Argmax of z_wrong - z_true over the L-inf ball and [0, 1]: separable, one sign per pixel."""
    w = model[1].weight.detach()
    direction = (w[1 - y] - w[y]).sign().view_as(x)
    return torch.minimum(torch.maximum(x + eps * direction, (x - eps).clamp(min=0)), (x + eps).clamp(max=1))


def linear_case(clipping: bool) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear 2-class model, 32 images (inside [eps, 1 - eps] unless `clipping`), labels, and the
    analytic L-inf optimum of every image."""
    model = linear_two_class()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 8, 8, generator=g)
    if not clipping:
        x = EPS + (1 - 2 * EPS) * x
    y = torch.randint(0, 2, (32,), generator=g)
    return model, x, y, analytic_optimum(model, x, y, EPS)


def true_margin(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return -margin(model(x), y)


@pytest.mark.parametrize("clipping", [False, True])
def test_fgsm_equals_the_analytic_optimum(clipping: bool) -> None:
    model = linear_two_class()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=g)
    if not clipping:
        x = EPS + (1 - 2 * EPS) * x  # keep the ball inside [0, 1]
    y = torch.randint(0, 2, (32,), generator=g)
    expected = analytic_optimum(model, x, y, EPS)
    got = FGSM(EPS).attack(model, x, y)
    assert torch.equal(got, expected)
    if not clipping:  # every pixel on a vertex of the ball
        assert torch.allclose((got - x).abs(), torch.full_like(x, EPS), atol=1e-6)


@pytest.mark.parametrize("cls", [IFGSM, PGD, CW])
@pytest.mark.parametrize("clipping", [False, True])
def test_iterative_attacks_reach_the_analytic_margin(cls, clipping: bool) -> None:
    model, x, y, optimum = linear_case(clipping)
    # eps/4 steps: 8 steps cross the ball from any start; 12 leave slack.
    x_adv = cls(EPS, steps=12, seed=0).attack(model, x, y)
    assert torch.allclose(x_adv, optimum, atol=1e-6)
    assert torch.allclose(true_margin(model, x_adv, y), true_margin(model, optimum, y), atol=1e-5)
    assert (true_margin(model, x_adv, y) < true_margin(model, x, y)).all()


def test_cw_margin_has_a_gradient_where_cross_entropy_saturates() -> None:
    model = linear_two_class()
    with torch.no_grad():
        model[1].weight.mul_(1e5)  # logit gaps ~1e4: float32 softmax (and its CE gradient) is exactly one-hot
    x = EPS + (1 - 2 * EPS) * torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1).detach()
    assert (F.softmax(model(x), 1).gather(1, y[:, None]) == 1).all()
    optimum = analytic_optimum(model, x, y, EPS)
    assert torch.allclose(CW(EPS, steps=12, seed=0).attack(model, x, y), optimum, atol=1e-6)
    assert torch.equal(IFGSM(EPS, steps=12).attack(model, x, y), x)  # CE gradient is exactly zero


def test_ifgsm_and_pgd_match_an_independent_reference_loop(trained, digits) -> None:
    _, _, xte, yte = digits
    x, y, eps, step, steps = xte[:64], yte[:64], 8 / 255, 2 / 255, 7

    def reference(x0: torch.Tensor) -> torch.Tensor:
        xa = x0.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(trained(xa), y), xa)
            xa = xa.detach() + step * grad.sign()
            xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
        return xa

    assert torch.equal(IFGSM(eps, step, steps).attack(trained, x, y), reference(x))
    # PGD's documented randomness: uniform(-eps, eps) from torch.Generator(seed) on x's device.
    noise = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(5))
    start = torch.min(torch.max(x + noise, x - eps), x + eps).clamp(0, 1)
    assert torch.equal(PGD(eps, step, steps, seed=5).attack(trained, x, y), reference(start))
    # A plain function (a twin, not an nn.Module) is attacked the same way.
    assert torch.equal(IFGSM(eps, step, steps).attack(lambda t: trained(t), x, y), reference(x))


def test_cw_margin_decreases_with_steps(trained, digits) -> None:
    _, _, xte, yte = digits
    margins = [true_margin(trained, CW(EPS, steps=n, seed=0).attack(trained, xte, yte), yte).mean().item()
               for n in (1, 2, 4, 8, 16)]
    assert all(b <= a + 1e-3 for a, b in zip(margins, margins[1:])), margins
    assert margins[-1] < margins[0] - 1.0, margins


def test_restarts_keep_the_worst_case_per_sample(trained, digits) -> None:
    _, _, xte, yte = digits
    one = PGD(EPS, steps=3, seed=11).attack(trained, xte, yte)
    three = PGD(EPS, steps=3, restarts=3, seed=11).attack(trained, xte, yte)  # its first run == `one`
    with torch.no_grad():
        l1, l3 = trained(one), trained(three)
    wrong1, wrong3 = l1.argmax(1) != yte, l3.argmax(1) != yte
    assert not (wrong1 & ~wrong3).any()
    both_right = ~wrong1 & ~wrong3
    ce = lambda z: F.cross_entropy(z, yte, reduction="none")  # noqa: E731
    assert (ce(l3)[both_right] >= ce(l1)[both_right] - 1e-6).all()
    assert wrong3.sum() > wrong1.sum()  # the extra starts found something


# -- Square: gradient-free, against onnxruntime itself ----------------------------------------------------
def ort_session(net: nn.Sequential) -> ort.InferenceSession:
    """The tiny CNN written as ONNX by hand (Conv, Relu, Flatten, Gemm) with a dynamic batch."""
    conv, fc = net[0], net[3]
    inits = [numpy_helper.from_array(t.detach().numpy(), name) for name, t in
             (("cw", conv.weight), ("cb", conv.bias), ("fw", fc.weight), ("fb", fc.bias))]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits,
    )
    # IR 9: new enough for opset 17, old enough for any onnxruntime >= 1.15.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_square_fools_onnxruntime_without_gradients(trained, digits) -> None:
    _, _, xte, yte = digits
    session = ort_session(trained)
    calls = []

    def runtime(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])  # numpy round trip: no graph

    with torch.no_grad():
        assert torch.allclose(runtime(xte), trained(xte), atol=1e-5)
    clean = accuracy(runtime, xte, yte)
    budget = 300
    attack = Square(EPS, budget, seed=0)
    calls.clear()
    x_adv = attack.attack(runtime, xte, yte)
    attack_calls = list(calls)
    robust = accuracy(runtime, x_adv, yte)
    assert (x_adv - xte).abs().max().item() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1

    # Honest baseline: the same number of queries spent on uniform random +-eps vertices.
    gen = torch.Generator().manual_seed(0)
    fooled = torch.zeros(len(xte), dtype=torch.bool)
    for _ in range(budget):
        noise = (torch.randint(0, 2, xte.shape, generator=gen) * 2 - 1).float() * EPS
        fooled |= runtime((xte + noise).clamp(0, 1)).argmax(1) != yte
    random_robust = 1 - fooled.float().mean().item()
    # Measured: clean 0.97, square300 0.31 (130 queries a sample on average), random300 0.76.
    assert robust <= min(clean - 0.4, 0.5), (clean, robust)
    assert robust <= random_robust - 0.3, (robust, random_robust)

    # Query accounting: clean misses cost nothing, successes stop early, nobody exceeds the budget.
    used = attack.queries_used
    assert used is not None and used.max().item() <= budget
    with torch.no_grad():
        clean_wrong = runtime(xte).argmax(1) != yte
        adv_wrong = runtime(x_adv).argmax(1) != yte
    assert (used[clean_wrong] == 0).all()
    assert (used[adv_wrong & ~clean_wrong] < budget).any()
    # Every image sent to the runtime is accounted for: one clean pass, then the counted queries,
    # and early stopping sent far fewer than the full budget.
    assert sum(attack_calls) == len(xte) + used.sum().item()
    assert used.sum().item() < 0.8 * budget * len(xte)


def test_square_is_reproducible_with_a_seed(trained, digits) -> None:
    _, _, xte, yte = digits
    a = Square(EPS, 50, seed=3).attack(trained, xte[:32], yte[:32])
    b = Square(EPS, 50, seed=3).attack(trained, xte[:32], yte[:32])
    c = Square(EPS, 50, seed=4).attack(trained, xte[:32], yte[:32])
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- EOT: stochastic models ------------------------------------------------------------------------------
class NoisyLinear(nn.Module):
    """2-class affine model whose weights are redrawn with noise at every call (counts its calls)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.lin = linear_two_class()[1]
        self.sigma = sigma
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        w = self.lin.weight + self.sigma * torch.randn_like(self.lin.weight)
        return F.linear(x.flatten(1), w, self.lin.bias)


@pytest.mark.parametrize("cls", [IFGSM, PGD, CW])
def test_eot_calls_the_model_k_times_per_step_and_is_deterministic(cls) -> None:
    model = NoisyLinear(sigma=0.05)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,))
    torch.manual_seed(0)
    first = cls(EPS, steps=3, eot=4, seed=1).attack(model, x, y)
    assert model.calls == 3 * 4
    torch.manual_seed(0)
    again = cls(EPS, steps=3, eot=4, seed=1).attack(model, x, y)
    assert torch.equal(first, again)
    if cls is not IFGSM:  # restarts score each run once per EOT pass
        model.calls = 0
        cls(EPS, steps=3, eot=4, restarts=2, seed=1).attack(model, x, y)
        assert model.calls == 2 * (3 * 4 + 4)


def test_eot_averaging_recovers_the_expected_gradient() -> None:
    model = NoisyLinear(sigma=0.1)  # noise twice the weights' scale: one draw's sign is unreliable
    clean = linear_two_class()
    x = EPS + (1 - 2 * EPS) * torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, dtype=torch.long)
    target = analytic_optimum(clean, x, y, EPS)
    torch.manual_seed(0)
    agree1 = (FGSM(EPS, eot=1).attack(model, x, y) == target).float().mean().item()
    agree64 = (FGSM(EPS, eot=64).attack(model, x, y) == target).float().mean().item()
    assert agree64 > 0.9 and agree64 > agree1 + 0.2, (agree1, agree64)


# -- names, settings and bad input -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS + ["ifgsm20", "pgd10", "square1000"])
def test_names_round_trip(spec: str) -> None:
    attack = parse_attack(spec, eps=8 / 255, seed=2)
    assert attack.name == spec
    assert parse_attack(attack.name, eps=8 / 255, seed=2).to_dict() == attack.to_dict()
    assert attack.to_dict()["eps"] == 8 / 255


def test_step_defaults_and_overrides() -> None:
    assert math.isclose(parse_attack("ifgsm20", eps=8 / 255).step, 2 / 255)
    assert math.isclose(parse_attack("pgd20", eps=8 / 255).step, 2 / 255)
    assert math.isclose(parse_attack("cw20", eps=8 / 255).step, 2 / 255)
    assert parse_attack("pgd20", eps=8 / 255, step=1 / 255).step == 1 / 255
    assert parse_attack("fgsm", eps=8 / 255, step=1 / 255).step == 8 / 255  # FGSM's step is eps
    assert parse_attack("pgd20", eps=0.1, restarts=4).restarts == 4
    assert parse_attack("ifgsm20", eps=0.1, restarts=4).restarts == 1  # deterministic: one run
    assert [a.name for a in parse_attacks(" ifgsm20, pgd20 ,square1000", eps=0.1)] == [
        "ifgsm20", "pgd20", "square1000"]
    assert parse_attack("square1000", eps=0.1).steps == 1000


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_eps_is_a_usage_error(eps: float) -> None:
    with pytest.raises(UsageError, match="eps"):
        parse_attack("pgd10", eps=eps)
    with pytest.raises(UsageError, match="eps"):
        Square(eps)


@pytest.mark.parametrize("kwargs", [{"step": 0.0}, {"step": -1.0}, {"steps": 0}, {"restarts": 0}, {"eot": 0}])
def test_bad_settings_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        PGD(0.1, **kwargs)


@pytest.mark.parametrize("spec", ["foo10", "ifgsm", "pgd", "pgd0", "fgsm3", "pgd10x", "pgd-5", "", "square"])
def test_bad_names_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError, match="ifgsmN"):
        parse_attacks(spec, eps=0.1)


def test_bad_input_shape_is_a_usage_error(trained) -> None:
    with pytest.raises(UsageError, match="N, C, H, W"):
        PGD(0.1).attack(trained, torch.rand(4, 64), torch.zeros(4, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_follows_x(trained, digits) -> None:
    _, _, xte, yte = digits
    net = tiny_cnn().cuda().eval()
    net.load_state_dict(trained.state_dict())
    for spec in SPECS:
        x_adv = parse_attack(spec, eps=EPS, seed=0).attack(net, xte[:16].cuda(), yte[:16])
        assert x_adv.device == xte[:16].cuda().device
