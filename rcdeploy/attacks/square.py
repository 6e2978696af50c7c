"""Square attack, L-inf (Andriushchenko et al., ECCV 2020): gradient-free random search.

Written here rather than imported: the reference code is NumPy with a Python loop over images,
and the packaged versions (AutoAttack, torchattacks) pull in dependencies we avoid on CPU torch
(torchvision). This version is batched over samples (one model call per query for all samples
still standing) and needs nothing from the model but logits, so it runs against onnxruntime
directly: the check that a gradient attack's figure is not an artefact of gradient masking.

The algorithm follows the reference: vertical-stripe init (one +-eps per column and channel),
then at each query one random square of side ~sqrt(p * H * W), filled with one +-eps per
channel, kept if it lowers the true-class margin; p follows the paper's piecewise-constant
schedule. Samples stop being queried once misclassified.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_left

import torch
from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model, margin
from rcdeploy.errors import UsageError

# Iteration (rescaled to a 10000-query budget) after which p halves once more: the paper's schedule.
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Redraws of a square that would not change the image (reference: unbounded while loop).
_MAX_REDRAWS = 10


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels the square covers at iteration `it` of `n_iters`."""
    return p_init / 2 ** bisect_left(_P_HALVINGS, int(it / n_iters * 10000))


@ATTACKS.register("square")
class Square(Attack):
    """`queries` model calls per sample at most (after one clean call); no gradients used.

    p_init 0.8 is AutoAttack's L-inf setting (the paper uses 0.05 for undefended models and
    more for robust ones; ours are adversarially trained). After a call, `queries_used` holds
    the per-sample number of queries spent (clean call not counted, as in the paper).
    """

    family = "square"
    uses_step = False
    black_box = True

    def __init__(
        self,
        eps: float,
        queries: int = 1000,
        *,
        p_init: float = 0.8,
        restarts: int = 1,
        eot: int = 1,
        seed: int | None = None,
    ) -> None:
        # The step of a square attack is its vertex value: every changed pixel moves by eps.
        super().__init__(eps, step=eps, steps=queries, restarts=restarts, eot=eot, seed=seed)
        if not (isinstance(p_init, numbers.Real) and 0 < p_init <= 1):
            raise UsageError(f"square p_init {p_init!r} is outside (0, 1]; it is the fraction of pixels changed")
        self.p_init = float(p_init)
        self.queries_used: Tensor | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "p_init": self.p_init}

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return margin(logits, y)

    def attack(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        self.queries_used = None
        return super().attack(model, x, y)

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        n, c, h, w = x.shape
        gen, dev = self.generator(x.device), x.device
        lo, hi = self.bounds(x)

        def signs(*shape: int) -> Tensor:
            return torch.randint(0, 2, shape, generator=gen, device=dev).to(x.dtype) * 2 - 1

        x_best = x.clone()
        m_best = margin(self.logits(model, x), y)  # > 0: misclassified, nothing to do
        queries = torch.zeros(n, dtype=torch.long, device=dev)
        todo = (m_best <= 0).nonzero().squeeze(1)
        if todo.numel():
            x_best[todo] = torch.clamp(x[todo] + self.eps * signs(todo.numel(), c, 1, w), lo[todo], hi[todo])
            m_best[todo] = margin(self.logits(model, x_best[todo]), y[todo])
            queries[todo] += 1

        rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
        for it in range(self.steps - 1):
            idx = (m_best <= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            k, xc, xb, lo_i, hi_i = idx.numel(), x[idx], x_best[idx], lo[idx], hi[idx]
            side = round(math.sqrt(p_selection(self.p_init, it, self.steps) * h * w))
            side = max(1, min(side, min(h, w) - 1))
            r0 = torch.randint(0, h - side + 1, (k, 1), generator=gen, device=dev)
            c0 = torch.randint(0, w - side + 1, (k, 1), generator=gen, device=dev)
            in_rows = (rows >= r0) & (rows < r0 + side)
            in_cols = (cols >= c0) & (cols < c0 + side)
            win = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # [k, 1, H, W]
            cand = torch.clamp(xc + self.eps * signs(k, c, 1, 1), lo_i, hi_i)
            for _ in range(_MAX_REDRAWS):  # redraw squares that would leave the image unchanged
                stuck = ((cand - xb).abs().lt(1e-7) | ~win).flatten(1).all(1)
                if not stuck.any():
                    break
                redraw = torch.clamp(xc + self.eps * signs(k, c, 1, 1), lo_i, hi_i)
                cand = torch.where(stuck[:, None, None, None], redraw, cand)
            x_new = torch.where(win, cand, xb)
            m_new = margin(self.logits(model, x_new), y[idx])
            queries[idx] += 1
            better = m_new > m_best[idx]
            x_best[idx] = torch.where(better[:, None, None, None], x_new, xb)
            m_best[idx] = torch.where(better, m_new, m_best[idx])

        self.queries_used = queries if self.queries_used is None else self.queries_used + queries
        return x_best
