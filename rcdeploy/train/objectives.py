"""Adversarial training objectives: one function per adversary, one signature.

Each takes (model, x, y, eps, settings, generator) in train mode and returns (loss, logits on the
inputs the loss was computed on). The attack runs through the quantized forward, so training sees
the deployed arithmetic. Each registers in `OBJECTIVES` under the name declared in `rcdeploy.names`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rcdeploy.attacks import parse_attack
from rcdeploy.names import OBJECTIVES


@dataclass(frozen=True)
class AdvSettings:
    eps: float
    steps: int
    step_size: float
    beta: float


__all__ = ["OBJECTIVES", "AdvSettings", "Objective", "fgsm_rs", "natural", "pgd", "trades"]

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
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-s.eps, s.eps)
    x_adv = (x + delta).clamp(0, 1)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


@OBJECTIVES.register("pgd")
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """Madry et al.: PGD-K with a random start, then cross-entropy on the adversarial batch."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen).item())
    attack = parse_attack(f"pgd{s.steps}", eps=s.eps, step=s.step_size, seed=seed)
    x_adv = attack(model, x, y)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


@OBJECTIVES.register("trades")
def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AdvSettings, gen: torch.Generator):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximizing the KL."""
    was_training = model.training
    model.eval()  # the reference implementation crafts x' in eval mode
    try:
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)).clamp(0, 1)
        for _ in range(s.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + s.step_size * grad.sign(), x - s.eps), x + s.eps).clamp(0, 1)
    finally:
        model.train(was_training)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + s.beta * robust, logits
