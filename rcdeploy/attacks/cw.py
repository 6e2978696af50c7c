"""CW-inf: L-inf PGD on the Carlini-Wagner margin loss max_{j != y} z_j - z_y.

The margin does not saturate the way softmax cross-entropy does, so it still has a useful
gradient on confident (and on gradient-masking) models; it is the usual companion of PGD.
"""

from __future__ import annotations

from torch import Tensor

from rcdeploy.attacks.base import ATTACKS, Attack, Model, margin


@ATTACKS.register("cw")
class CW(Attack):
    """Random start in the ball, then `steps` signed margin-gradient steps of size `step`."""

    family = "cw"

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return margin(logits, y)

    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        lo, hi = self.bounds(x)
        return self.signed_ascent(model, self.random_start(x, lo, hi), y, lo, hi)
