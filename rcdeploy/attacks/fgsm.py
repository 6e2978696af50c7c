"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps."""

from __future__ import annotations

from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """x + eps * sign(grad CE), clamped to [0, 1]. Deterministic; step is eps by definition."""

    family = "fgsm"
    counted = False

    def __init__(self, eps: float, *, restarts: int = 1, eot: int = 1, seed: int | None = None) -> None:
        super().__init__(eps, step=eps, steps=1, restarts=restarts, eot=eot, seed=seed)

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        return self.signed_ascent(model, x, y, *self.bounds(x))
