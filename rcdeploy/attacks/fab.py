"""FAB-T, L-inf (Croce & Hein, ICML 2020): the fast adaptive boundary attack, targeted; AutoAttack's third.

Written here rather than imported: torchattacks and autoattack pull in torchvision, which breaks
the CPU torch we pin. The loop follows the reference (autoattack/fab_base.py, targeted runs):

- one run per target, the `targets` most likely other classes of the clean logits (9 in AutoAttack),
  each on the images no earlier run has broken; per target, `restarts` runs: the first from x, the
  others from a random point at L-inf distance eps/2 (the reference's restarts);
- an iteration linearises g = z_target - z_true at the current point x1 and projects both x1 and the
  original x onto the hyperplane g = 0 inside [0, 1] (`project_linf`: the smallest L-inf step under
  the box constraints);
- the next point blends the two projections, overshot by eta = 1.05:
  (1 - alpha) (x1 + eta d1) + alpha (x + eta d2), alpha = min(|d1| / (|d1| + |d2|), alpha_max = 0.1);
  the pull towards x's projection is what keeps the adversarial small;
- a misclassified x1 is kept when it is the smallest-norm one so far, then x1 steps back towards x
  by beta = 0.9, to look for a smaller one.

What it returns (the reference returns the minimal adversarial even beyond eps, and AutoAttack then
counts the image as unbroken): every image stays in the eps ball and [0, 1]. Per image, the smallest
adversarial a run found, when it lies in the ball; otherwise the in-ball point with the highest CW
margin among x and each run's result (its smallest adversarial, or its last iterate when it found
none) clipped into the ball. Clipping the minimum towards x keeps FAB's direction, so the returned
point sits nearer the boundary than x does (and, on a curved model, is sometimes adversarial itself);
robust accuracy is the same as AutoAttack's count, and chained attacks get a useful starting margin.
Every candidate is clamped to the ball and checked on the model before it counts: a straight-through
twin (piecewise-constant function, surrogate gradients) can mislead the linearisation, not the check.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model, margin
from rcdeploy.errors import UsageError

ALPHA_MAX = 0.1  # most weight the projection of x gets in the blend (paper / AutoAttack)
ETA = 1.05  # overshoot past the linearised boundary
BETA = 0.9  # backward step towards x after an adversarial is found


def project_linf(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per row, the smallest L-inf step d with w.(t + d) = b and t + d in [0, 1] (rows of t in [0, 1]).

    Where the box makes the hyperplane unreachable, the full move to the box corner that gets closest
    (the reference's choice). Moving each coordinate by at most lam changes w.t by
    sum_i |w_i| min(lam, room_i), piecewise linear in lam: sort the rooms, find the piece that covers
    the residual and solve on it (the reference bisects over the same breakpoints).
    """
    resid = (w * t).sum(1) - b
    # Each coordinate moves so as to shrink |resid|; a zero weight does not move.
    direction = -torch.sign(w) * torch.where(resid >= 0, 1.0, -1.0).to(w.dtype)[:, None]
    room = torch.where(direction > 0, 1 - t, t)  # how far before the [0, 1] box stops it
    room_sorted, order = room.sort(1)
    weight = w.abs().gather(1, order)
    # At lam = room_sorted[k]: coordinates j < k are saturated, j >= k move by lam.
    saturated = torch.cat((torch.zeros_like(weight[:, :1]), (weight * room_sorted).cumsum(1)[:, :-1]), 1)
    moving = weight.flip(1).cumsum(1).flip(1)
    reach = saturated + room_sorted * moving  # nondecreasing in k
    need = resid.abs()[:, None]
    k = (reach < need).sum(1, keepdim=True)  # the first breakpoint that covers the residual
    reachable = k < w.shape[1]
    k = k.clamp(max=w.shape[1] - 1)
    lam = (need - saturated.gather(1, k)) / moving.gather(1, k).clamp_min(torch.finfo(w.dtype).tiny)
    lam = torch.where(reachable, lam.clamp_min(0), math.inf)
    return direction * torch.minimum(room, lam)


def _positive(what: str, value: Any, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise UsageError(f"fab-t {what} {value!r} must be a positive number")
    if upper is not None and value > upper:
        raise UsageError(f"fab-t {what} {value!r} must be at most {upper}")
    return float(value)


@ATTACKS.register("fab-t")
class FABT(Attack):
    """FAB-T: `steps` iterations per target and restart. `loss` (how runs are compared per image) is
    the CW margin, target-free, as in APGD-T. FAB has no step size: the projection sets each move."""

    family = "fab-t"
    uses_step = False

    def __init__(
        self,
        eps: float,
        steps: int = 100,
        *,
        targets: int = 9,
        alpha_max: float = ALPHA_MAX,
        eta: float = ETA,
        beta: float = BETA,
        restarts: int = 1,
        eot: int = 1,
        seed: int | None = None,
    ) -> None:
        # The base class wants a step; eps stands in (reports only, FAB never reads it).
        super().__init__(eps, step=eps, steps=steps, restarts=restarts, eot=eot, seed=seed)
        if isinstance(targets, bool) or not isinstance(targets, numbers.Integral) or targets < 1:
            raise UsageError(f"fab-t targets {targets!r} must be an integer >= 1")
        self.targets = int(targets)
        self.alpha_max = _positive("alpha_max", alpha_max, upper=1.0)
        self.eta = _positive("eta", eta)
        self.beta = _positive("beta", beta, upper=1.0)
        self._runs = self.restarts

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "targets": self.targets, "alpha_max": self.alpha_max, "eta": self.eta,
                "beta": self.beta}

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return margin(logits, y)

    def attack(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        # Restarts run inside `perturb`, per target and on still-unbroken images only (the reference's
        # loop); the base class's loop would attack every image again from scratch.
        self._runs, self.restarts = self.restarts, 1
        try:
            return super().attack(model, x, y)
        finally:
            self.restarts = self._runs

    def gap_grad(self, model: Model, x1: Tensor, y: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """z_target - z_true per image (negative while x1 is classified y) and its input gradient,
        from logits averaged over `eot` passes."""
        xr = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = sum(model(xr) for _ in range(self.eot)) / self.eot
            gap = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(gap.sum(), xr)
        return gap.detach(), grad

    def run(self, model: Model, x: Tensor, y: Tensor, target: Tensor, random_start: bool) -> tuple[Tensor, Tensor]:
        """One FAB run towards `target`: per image the smallest-norm adversarial met (its last iterate
        when it met none) and that adversarial's L-inf distance to x (inf when none)."""
        n, shape = len(x), (-1,) + (1,) * (x.ndim - 1)
        x_flat = x.flatten(1)
        x1 = x.clone()
        if random_start:  # a uniform direction scaled to L-inf norm eps/2, as the reference
            t = torch.empty_like(x).uniform_(-1, 1, generator=self.generator(x.device))
            t = t / t.flatten(1).abs().amax(1).clamp_min(torch.finfo(x.dtype).tiny).view(shape)
            x1 = (x + 0.5 * self.eps * t).clamp(0, 1)
        best, best_norm = x1.clone(), torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        for _ in range(self.steps):
            gap, grad = self.gap_grad(model, x1, y, target)
            w = grad.flatten(1)
            b = (w * x1.flatten(1)).sum(1) - gap  # {z : w.z = b} is where the linearised gap is zero
            d = project_linf(torch.cat((x1.flatten(1), x_flat)), torch.cat((w, w)), torch.cat((b, b)))
            size = d.abs().amax(1).clamp_min(1e-8)
            alpha = (size[:n] / (size[:n] + size[n:])).clamp(0, self.alpha_max).view(shape)
            step = (1 - alpha) * (x1 + self.eta * d[:n].view_as(x)) + alpha * (x + self.eta * d[n:].view_as(x))
            # A non-finite gradient (a broken twin) must not poison the iterate: stay put there.
            x1 = torch.where(step.isfinite(), step, x1).clamp(0, 1)
            adv = self.logits(model, x1).argmax(1) != y
            norm = (x1 - x).flatten(1).abs().amax(1)
            smaller = adv & (norm < best_norm)
            best = torch.where(smaller.view(shape), x1, best)
            best_norm = torch.where(smaller, norm, best_norm)
            x1 = torch.where(adv.view(shape), x + self.beta * (x1 - x), x1)
        return torch.where(best_norm.isinf().view(shape), x1, best), best_norm

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        clean = self.logits(model, x)
        others = clean.masked_fill(F.one_hot(y, clean.shape[1]).bool(), -math.inf)
        order = others.topk(min(self.targets, clean.shape[1] - 1), dim=1).indices
        lo, hi = self.bounds(x)
        best, best_loss = x.clone(), self.loss(clean, y)
        broken = clean.argmax(1) != y  # images already misclassified are left as they are
        for j in range(order.shape[1]):
            for r in range(self._runs):
                todo = (~broken).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return best
                cand, _ = self.run(model, x[todo], y[todo], order[todo, j], random_start=r > 0)
                # Into the ball, and judged by the model there: this is the point returned.
                cand = torch.clamp(torch.where(cand.isfinite(), cand, x[todo]), lo[todo], hi[todo])
                logits = self.logits(model, cand)
                wrong, loss = logits.argmax(1) != y[todo], self.loss(logits, y[todo])
                better = (wrong | (loss > best_loss[todo])).view((-1,) + (1,) * (x.ndim - 1))
                best[todo] = torch.where(better, cand, best[todo])
                best_loss[todo] = torch.where(better.flatten(), loss, best_loss[todo])
                broken[todo] = wrong
        return best
