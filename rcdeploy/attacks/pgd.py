"""PGD (Madry et al. 2018): IFGSM from a uniform random start in the eps ball, with restarts."""

from __future__ import annotations

from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model


@ATTACKS.register("pgd")
class PGD(Attack):
    """Uniform start in the ball, then `steps` signed CE-gradient steps of size `step`."""

    family = "pgd"

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        lo, hi = self.bounds(x)
        return self.signed_ascent(model, self.random_start(x, lo, hi), y, lo, hi)
