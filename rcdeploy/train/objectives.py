"""Adversarial training objectives: one function per adversary, one signature.

Each takes (model, x, y, eps, settings, generator) in train mode and returns (loss, logits on the
inputs the loss was computed on). The attack runs through the quantized forward, so training sees
the deployed arithmetic. Each registers in `OBJECTIVES` under the name declared in `rcdeploy.names`.

`model` may be a DistributedDataParallel wrapper: the loss's forwards go through it, the attacks
through `unwrap(model)`, whose input gradients must not enter DDP's gradient reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rcdeploy.attacks import parse_attack
from rcdeploy.distributed import unwrap
from rcdeploy.errors import UsageError
from rcdeploy.names import OBJECTIVES


@dataclass(frozen=True)
class AdvSettings:
    eps: float
    steps: int
    step_size: float
    beta: float
    alpha: float = 0.5  # `mixed`: weight of the adversarial term; `ard`: weight of the distillation term
    temperature: float = 30.0  # `ard`: distillation temperature T (the ARD reference code's default)
    teacher: nn.Module | None = field(default=None, compare=False, repr=False)  # `ard`: frozen, eval mode


__all__ = ["OBJECTIVES", "AdvSettings", "Objective", "ard", "ard_examples", "distillation_kl", "fgsm_rs",
           "mixed", "natural", "pgd", "trades"]

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, AdvSettings, torch.Generator], tuple]


def _uniform_like(x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * eps


@OBJECTIVES.register("none")
def natural(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


@OBJECTIVES.register("fgsm-rs")
def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """Fast adversarial training (Wong et al. 2020): uniform start, one step of 1.25 eps, projected."""
    alpha = 1.25 * s.eps
    delta = _uniform_like(x, s.eps, gen)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    loss = F.cross_entropy(unwrap(model)(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-s.eps, s.eps)
    x_adv = (x + delta).clamp(0, 1)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def pgd_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings,
                 gen: torch.Generator) -> torch.Tensor:
    """PGD-K from a uniform random start in the eps ball (a real one: the attack's `random_start`),
    through the quantized forward, seeded from the batch's generator so a batch replays exactly."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen).item())
    attack = parse_attack(f"pgd{s.steps}", eps=s.eps, step=s.step_size, seed=seed)
    return attack(unwrap(model), x, y)


@OBJECTIVES.register("pgd")
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """Madry et al.: PGD-K with a random start, then cross-entropy on the adversarial batch."""
    logits = model(pgd_examples(model, x, y, s, gen))
    return F.cross_entropy(logits, y), logits


@OBJECTIVES.register("mixed")
def mixed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """(1 - alpha) CE(f(x), y) + alpha CE(f(x_adv), y), x_adv from `pgd_examples` (Goodfellow et al. 2015's
    mixed objective; ATMC's reference code trains with alpha 0.5). A term with weight 0 is not computed:
    alpha 1 is the `pgd` objective exactly (same attack draws, same BatchNorm updates), alpha 0 runs no
    attack. The logits returned are the adversarial ones when there is an attack (as `pgd`), else clean."""
    a = float(s.alpha)
    if not 0.0 <= a <= 1.0:
        raise UsageError(f"--alpha {a:g} is outside [0, 1]: it weighs the adversarial term of the mixed loss")
    if a == 0.0:
        return natural(model, x, y, s, gen)
    adv_logits = model(pgd_examples(model, x, y, s, gen))
    loss = F.cross_entropy(adv_logits, y)
    if a < 1.0:
        loss = (1.0 - a) * F.cross_entropy(model(x), y) + a * loss
    return loss, adv_logits


@OBJECTIVES.register("trades")
def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximizing the KL."""
    net = unwrap(model)
    was_training = net.training
    net.eval()  # the reference implementation crafts x' in eval mode
    try:
        with torch.no_grad():
            p_clean = F.softmax(net(x), dim=1)
        x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)).clamp(0, 1)
        for _ in range(s.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(net(x_adv), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + s.step_size * grad.sign(), x - s.eps), x + s.eps).clamp(0, 1)
    finally:
        net.train(was_training)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + s.beta * robust, logits


# ------------------------------------------------------------------------- ARD: robust distillation


def ard_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings,
                 gen: torch.Generator) -> torch.Tensor:
    """ARD's inner maximization: PGD-K on the student's own cross-entropy from a uniform start in the eps
    ball, clamped to [0, 1] (`pgd_examples`, through `unwrap(model)`, in eval mode as every attack here).
    The reference code (github.com/goldblum/AdversariallyRobustDistillation, main.py `AttackPGD`) crafts
    x_adv this way, on CE(student(x'), y), not on the distillation KL; it runs the attack in train mode."""
    return pgd_examples(model, x, y, s, gen)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), summed over classes, averaged over the batch.

    The ARD paper's KL; its reference code's nn.KLDivLoss() also averages over the classes (1/C of this)."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean")
    return t * t * kl


@OBJECTIVES.register("ard")
def ard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """Adversarially robust distillation (Goldblum, Fowl, Feizi, Goldstein, AAAI 2020):
    alpha T^2 KL(teacher^T(x) || student^T(x_adv)) + (1 - alpha) CE(student(x), y), with x_adv from
    `ard_examples`, the teacher (`s.teacher`, frozen, eval mode) on the clean batch, the CE on clean inputs
    without temperature, as the reference code's loss. As `mixed`, a term with weight 0 is not computed
    (alpha 0 is `none`). Returns the loss and the student's logits on x_adv (clean ones when alpha is 0)."""
    a = float(s.alpha)
    if not 0.0 <= a <= 1.0:
        raise UsageError(f"--alpha {a:g} is outside [0, 1]: it weighs the distillation term of the ARD loss")
    if s.teacher is None:
        raise UsageError("--adv ard distills a teacher: pass --teacher PATH")
    if a == 0.0:
        return natural(model, x, y, s, gen)
    x_adv = ard_examples(model, x, y, s, gen)
    with torch.no_grad():
        teacher_logits = s.teacher(x)
    adv_logits = model(x_adv)
    loss = a * distillation_kl(adv_logits, teacher_logits, s.temperature)
    if a < 1.0:
        loss = loss + (1.0 - a) * F.cross_entropy(model(x), y)
    return loss, adv_logits
