"""APGD, L-inf (Croce & Hein, ICML 2020): PGD whose step size schedules itself; AutoAttack's core.

Written here rather than imported: torchattacks and autoattack pull in torchvision, which breaks
the CPU torch we pin. The loop follows the reference (autoattack/autopgd_base.py):

- initial step 2*eps; momentum alpha 0.75 (the first step has none);
- checkpoints after 22% of the budget, then intervals shrinking by 3% to at least 6%
  (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06));
- at a checkpoint a sample's step halves, and it restarts from its best point, when fewer than
  rho = 0.75 of the steps since the last checkpoint raised the loss, or when its step was not
  halved last time and its best loss has not improved since.

`apgd-ceN` maximises cross-entropy; `apgd-tN` runs once per target, the top-k other classes of
the clean logits, maximising the targeted DLR loss (scale-invariant, so softmax saturation and
logit rescaling cannot hide the gradient). Per sample the worst run is kept. Restarts (random
starts) come from the base class.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model, margin
from rcdeploy.errors import UsageError

RHO = 0.75  # fraction of loss-raising steps below which the step halves (paper)
ALPHA = 0.75  # momentum: weight of the new step; 1 - ALPHA goes to the previous displacement


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size is checked, for a budget of `steps` (the paper's p_j)."""
    first, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at, k = [], 0, first
    while at + k <= steps:
        at += k
        out.append(at)
        k = max(k - shrink, least)
    return out


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): the paper's targeted DLR, to be maximised.

    Under four classes the normaliser does not exist; the plain logit gap z_t - z_y stands in.
    """
    gap = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
    if logits.shape[1] < 4:
        return gap
    top = logits.sort(1, descending=True).values
    return gap / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


class APGD(Attack):
    """One APGD run per `perturb`; subclasses choose the loss. The step size is not a setting."""

    uses_step = False

    def __init__(self, eps: float, steps: int = 100, *, restarts: int = 1, eot: int = 1, seed: int | None = None):
        super().__init__(eps, step=2 * eps, steps=steps, restarts=restarts, eot=eot, seed=seed)

    def loss_grad(self, model: Model, x_adv: Tensor, y: Tensor, loss_fn) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-sample loss and input gradient, each averaged over `eot` forward passes."""
        xr = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = sum(model(xr) for _ in range(self.eot)) / self.eot
            loss = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(loss.sum(), xr)
        return logits.detach(), loss.detach(), grad

    def run(self, model: Model, x: Tensor, y: Tensor, loss_fn) -> Tensor:
        """One APGD run from a random start: the best-loss point, unless it is classified right and
        another point met on the way was not (then the first such point)."""
        lo, hi = self.bounds(x)
        x_adv = self.random_start(x, lo, hi)
        logits, loss, grad = self.loss_grad(model, x_adv, y, loss_fn)
        wrong = logits.argmax(1) != y
        best_wrong = wrong.clone()
        x_wrong, x_best, loss_best, grad_best = x_adv.clone(), x_adv.clone(), loss.clone(), grad.clone()
        step = torch.full((len(x), 1, 1, 1), 2 * self.eps, dtype=x.dtype, device=x.device)
        x_prev, losses = x_adv, [loss]
        checks, last = set(checkpoints(self.steps)), 0
        best_at_check, halved_last = loss_best.clone(), torch.ones_like(wrong)
        for i in range(self.steps):
            a = ALPHA if i > 0 else 1.0  # no previous displacement before the first step
            z = torch.clamp(x_adv + step * grad.sign(), lo, hi)
            x_new = torch.clamp(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), lo, hi)
            x_prev, x_adv = x_adv, x_new
            logits, loss, grad = self.loss_grad(model, x_adv, y, loss_fn)
            now_wrong = logits.argmax(1) != y
            x_wrong = torch.where((now_wrong & ~wrong)[:, None, None, None], x_adv, x_wrong)
            wrong |= now_wrong
            up = loss > loss_best
            x_best = torch.where(up[:, None, None, None], x_adv, x_best)
            grad_best = torch.where(up[:, None, None, None], grad, grad_best)
            loss_best = torch.where(up, loss, loss_best)
            best_wrong = torch.where(up, now_wrong, best_wrong)
            losses.append(loss)
            if i + 1 in checks:
                k = i + 1 - last
                raised = sum((losses[-j] > losses[-j - 1]).to(x.dtype) for j in range(1, k + 1))
                halve = (raised <= k * RHO) | (~halved_last & (loss_best <= best_at_check))
                step = torch.where(halve[:, None, None, None], step / 2, step)
                # Restart halved samples from their best point; momentum starts afresh there.
                x_adv = torch.where(halve[:, None, None, None], x_best, x_adv)
                x_prev = torch.where(halve[:, None, None, None], x_best, x_prev)
                grad = torch.where(halve[:, None, None, None], grad_best, grad)
                halved_last, best_at_check, last, losses = halve, loss_best.clone(), i + 1, losses[-1:]
        return torch.where((wrong & ~best_wrong)[:, None, None, None], x_wrong, x_best)


@ATTACKS.register("apgd-ce")
class APGDCE(APGD):
    """APGD on the cross-entropy loss (untargeted)."""

    family = "apgd-ce"

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        return self.run(model, x, y, lambda z, t: F.cross_entropy(z, t, reduction="none"))


@ATTACKS.register("apgd-t")
class APGDT(APGD):
    """APGD on the targeted DLR loss, one run per target (the `targets` most likely other classes).

    `loss` (how restarts and targets are compared per sample) is the CW margin: target-free.
    """

    family = "apgd-t"

    def __init__(self, eps: float, steps: int = 100, *, targets: int = 9, restarts: int = 1, eot: int = 1,
                 seed: int | None = None):
        super().__init__(eps, steps, restarts=restarts, eot=eot, seed=seed)
        if isinstance(targets, bool) or not isinstance(targets, numbers.Integral) or targets < 1:
            raise UsageError(f"apgd-t targets {targets!r} must be an integer >= 1")
        self.targets = int(targets)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "targets": self.targets}

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return margin(logits, y)

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        clean = self.logits(model, x)
        others = clean.masked_fill(F.one_hot(y, clean.shape[1]).bool(), -math.inf)
        order = others.topk(min(self.targets, clean.shape[1] - 1), dim=1).indices
        best, best_loss = x.clone(), self.loss(clean, y)
        for j in range(order.shape[1]):
            todo = (best_loss <= 0).nonzero().squeeze(1)  # samples no target has broken yet
            if todo.numel() == 0:
                break
            t = order[todo, j]
            cand = self.run(model, x[todo], y[todo], lambda z, yy, t=t: dlr_targeted(z, yy, t))
            cand_loss = self.loss(self.logits(model, cand), y[todo])
            better = cand_loss > best_loss[todo]
            best[todo] = torch.where(better[:, None, None, None], cand, best[todo])
            best_loss[todo] = torch.where(better, cand_loss, best_loss[todo])
        return best
