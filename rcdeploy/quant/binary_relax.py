"""Binary-Relax quantization (Yin, Zhang, Lyu, Osher, Qi, Xin, "BinaryRelax: A Relaxation Approach for
Training Deep Neural Networks with Quantized Weights", 2018; used on EnResNets in arXiv 2008.13305).

Phase 1 (relaxed) trains with pseudo-quantized weights w_r = (w + lambda * Q(w)) / (1 + lambda), the
minimiser of ||u - w||^2 + lambda * dist(u, Q)^2, while lambda grows geometrically each epoch, pulling
the weights onto the quantization grid gradually instead of snapping them there from the first step.
Phase 2 (exact) trains with Q(w) itself at a reduced learning rate.

Q is the layer's own Brevitas weight quantizer (binary, ternary, 4-bit, ..., with its learned
per-channel scale), so there is nothing to convert at the end: phase 2 *is* the plain Brevitas
model, and checkpoints, export and bench see an ordinary quantized model. The relaxation is a forward
hook on each layer's weight-quantizer proxy that returns w_r in place of Q(w); removing the hooks is
the switch to phase 2. lambda = 0 gives the float forward (w_r = w); lambda -> inf gives Q(w).
Gradients reach w through both terms (Q by Brevitas' straight-through estimator) and reach the scale
through Q, so the scales are learned in phase 1 too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from brevitas.quant_tensor import QuantTensor
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.names import QUANT_METHODS
from rcdeploy.quant.spec import weight_layers

EXACT_LR = 0.1  # default learning-rate factor in the exact phase (the "small learning rate")


def relaxed(w: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """(w + lam * q) / (1 + lam); lam = inf gives q exactly."""
    if math.isinf(lam):
        return q
    return (w + lam * q) / (1.0 + lam)


@QUANT_METHODS.register("binary-relax")
class BinaryRelax:
    """Drives the relaxation of every quantized weight layer of a model, epoch by epoch.

    The trainer calls `start_epoch(model, epoch)` before each epoch (also after a resume), multiplies the
    learning rate by `lr_factor(epoch)`, keeps only `eligible(epoch)` epochs as best checkpoints (the
    exact phase: what export will ship), logs `stats()` and checkpoints `state_dict()`.
    """

    name = "binary-relax"

    def __init__(self, model: nn.Module, *, epochs: int, lam: float = 1.0, growth: float = 1.05,
                 exact_fraction: float = 0.2, exact_lr: float = EXACT_LR) -> None:
        if lam < 0 or growth < 1:
            raise UsageError(f"binary-relax needs lambda >= 0 and growth >= 1 (got {lam}, {growth})")
        if not 0 <= exact_fraction <= 1 or not 0 < exact_lr <= 1:
            raise UsageError("binary-relax needs an exact-phase share in [0, 1] and an lr factor in (0, 1]")
        self.layers = [name for name, layer in weight_layers(model) if layer.weight_quant.is_quant_enabled]
        if not self.layers:
            raise UsageError("--quant binary-relax needs quantized weights; pass --bits 4, 2 (ternary) or 1 (binary)")
        self.lam0 = float(lam)
        self.growth = float(growth)
        self.exact_lr = float(exact_lr)
        # At least one exact epoch: the checkpoint that export reads must be the exactly quantized model.
        exact_epochs = max(1, round(epochs * exact_fraction)) if exact_fraction > 0 else 0
        self.exact_start = max(0, epochs - exact_epochs)
        self.lam = self.lambda_at(0)
        self._handles: dict[str, Any] = {}

    # -- schedule --------------------------------------------------------------------------------
    def lambda_at(self, epoch: int) -> float:
        """lambda0 * growth**epoch in the relaxed phase, inf in the exact phase."""
        if epoch >= self.exact_start:
            return math.inf
        return self.lam0 * self.growth ** epoch

    def exact(self, epoch: int) -> bool:
        return epoch >= self.exact_start

    def lr_factor(self, epoch: int) -> float:
        return self.exact_lr if self.exact(epoch) else 1.0

    def eligible(self, epoch: int) -> bool:
        return self.exact(epoch)

    # -- the switch ------------------------------------------------------------------------------
    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        self.set_lambda(model, self.lambda_at(epoch))

    def set_lambda(self, model: nn.Module, lam: float) -> None:
        """Relax with this lambda from now on (inf: exact quantization, hooks removed)."""
        if lam < 0:
            raise ValueError("lambda must be >= 0")
        self.lam = float(lam)
        if math.isinf(self.lam):
            self.remove()
            return
        for name in self.layers:
            if name not in self._handles:
                proxy = model.get_submodule(name).weight_quant
                self._handles[name] = proxy.register_forward_hook(self._relax)

    def remove(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles.clear()

    def _relax(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        q = output.value if isinstance(output, QuantTensor) else output
        return relaxed(args[0], q, self.lam)

    # -- reporting and state ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"method": self.name, "phase": "relaxed" if self._handles else "exact",
                "lambda": None if math.isinf(self.lam) else self.lam, "exact_start": self.exact_start}

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "lam0": self.lam0, "growth": self.growth, "exact_lr": self.exact_lr,
                "exact_start": self.exact_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise UsageError(f"plugin state is for {state.get('method')!r}, not {self.name!r}")
        self.lam0 = float(state["lam0"])
        self.growth = float(state["growth"])
        self.exact_lr = float(state["exact_lr"])
        self.exact_start = int(state["exact_start"])
