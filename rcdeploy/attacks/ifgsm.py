"""IFGSM / BIM (Kurakin et al. 2017): iterated FGSM from the clean image, no random start."""

from __future__ import annotations

from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model


@ATTACKS.register("ifgsm")
class IFGSM(Attack):
    """`steps` signed CE-gradient steps of size `step` (default in base.DEFAULT_STEP_FRACTION)."""

    family = "ifgsm"

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        return self.signed_ascent(model, x, y, *self.bounds(x))
