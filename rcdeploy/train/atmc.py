"""ATMC (Gui, Wang, Yang, Yu, Wang, Liu, "Model Compression with Adversarial Robustness: A Unified
Optimization Framework", NeurIPS 2019): `--sparsity atmc --prune-weights 0.9 --codebook-bits 4`.

Constrained adversarial training: min f(W) s.t. ONE global L0 budget over all conv and linear weights
and at most 2**b codebook values per tensor, solved as in the reference code (github shupenggui/ATMC):

* loss += rho/2 ||W - Z + U||^2 over all weight tensors (rho 0.1);
* after every optimizer step, the global top-k projection of W (`unstructured.project_global_topk`: the
  k largest |w| across every tensor, not per layer);
* every `quant_interval` steps (10), Z <- codebook(W + U) on the support of W, U <- U + W - Z;
* final phase (the trainer's fine-tune epochs): one last Z-step, then W = Z and the weight quantizers'
  scales are held fixed, so only BatchNorm, biases and activation ranges train, and every checkpoint
  that may become best.pt is the codebook model itself.

Ours, not the reference's: the Z-step runs on the integer grid of each layer's Brevitas weight quantizer
(`rcdeploy.quant.codebook`: centers are integers times the channel scale, zero kept as a center, a
symmetric codebook by default), so the exported int8 tensors hold at most 2**b distinct nonzero integers;
the factorized form W = (B + I) A + C is not offered (it is full rank in the reference code, its own
figure shows AL0 ~ ATMC-32bit, and its product would leave the codebook at export). Not copied from the
reference: its no-op PGD random start (rcdeploy's PGD starts at a uniform point of the ball), selection of
checkpoints on the test set (the trainer selects on the validation split), and leaving tensors with few
nonzeros unquantized (every tensor gets its codebook). Deployment: zeros and codebooks shrink the file
only under compression (the exported QLinearConv is dense int8): the model card reports the theoretical
size and the zip size, `rcdeploy bench` the latency.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.models.channels import unwrap
from rcdeploy.quant.codebook import fit_codebook
from rcdeploy.quant.presets import FLOAT
from rcdeploy.quant.spec import layer_bits, weight_layers
from rcdeploy.train.admm import admm_penalty
from rcdeploy.train.sparsity import register_sparsity
from rcdeploy.train.unstructured import _Unstructured, global_topk_masks, project_global_topk

RHO = 0.1  # reference code, hard-coded in its training call
QUANT_INTERVAL = 10  # batches between Z/U updates (reference `--quant_interval`)
CODEBOOK_BITS = 4


def grid(layer: nn.Module) -> tuple[torch.Tensor | None, int | None]:
    """The per-output-channel scale and the largest integer of a layer's weight quantizer (None, None: float)."""
    bits = layer_bits(layer)
    if bits == FLOAT:
        return None, None
    with torch.no_grad():
        qw = layer.quant_weight()
    return qw.scale.detach().reshape(-1), 2 ** (bits - 1) - 1  # narrow range: [-(2^(n-1) - 1), 2^(n-1) - 1]


def relative_residual(ws: list[torch.Tensor], zs: list[torch.Tensor]) -> float:
    """||W - Z|| / ||W|| over all tensors together."""
    num = sum(float(((w.detach() - z.to(w.device)).double() ** 2).sum()) for w, z in zip(ws, zs))
    den = sum(float((w.detach().double() ** 2).sum()) for w in ws)
    return (num / den) ** 0.5 if den > 0 else 0.0


@register_sparsity("atmc")
class ATMC(_Unstructured):
    """Global L0 budget + ADMM integer codebooks (see the module docstring). `target` is the share of all
    conv and linear weights that are zero."""

    name = "atmc"

    def __init__(self, model: nn.Module, *, target: float, codebook_bits: int = CODEBOOK_BITS, rho: float = RHO,
                 quant_interval: int = QUANT_INTERVAL, symmetric: bool = True, **kw: Any) -> None:
        if not 0 < target < 1:
            raise UsageError(f"ATMC prunes to one global weight budget: pass --prune-weights in (0, 1), got {target}")
        if isinstance(codebook_bits, bool) or not isinstance(codebook_bits, int) or not 1 <= codebook_bits <= 8:
            raise UsageError(f"--codebook-bits must be an integer in 1..8, got {codebook_bits!r}")
        if (isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0
                or isinstance(quant_interval, bool) or not isinstance(quant_interval, int) or quant_interval < 1):
            raise UsageError(f"ATMC needs a number rho > 0 and an integer quant_interval >= 1, got rho {rho!r}, "
                             f"quant_interval {quant_interval!r}")
        m = unwrap(model)
        binary = [n for n, layer in weight_layers(m) if layer_bits(layer) == 1]
        if binary:  # a zero weight has no binary code: the L0 budget would not reach the deployed model
            raise UsageError(f"--sparsity atmc needs weights of 2 bits or more (binary layers: {', '.join(binary[:3])})")
        super().__init__(model, target=target, **kw)
        self.codebook_bits = codebook_bits
        self.rho = float(rho)
        self.quant_interval = quant_interval
        self.symmetric = bool(symmetric)
        self.step_count = 0
        self.residuals: list[tuple[int, float]] = []  # (epoch, ||W - Z|| / ||W||) after each Z/U update
        self.fixed_scales: list[torch.Tensor] | None = None  # final phase: weight-quantizer scales held here
        self.centers: list[torch.Tensor | None] = [None] * len(self.layer_names)  # per tensor, in grid units
        ws = self.weights(m)
        project_global_topk(ws, self.target)
        self.z = self.z_step(m, [torch.zeros_like(w) for w in ws])
        self.u = [torch.zeros_like(w) for w in ws]

    # -- ADMM --------------------------------------------------------------------------------------
    @torch.no_grad()
    def z_step(self, model: nn.Module, us: list[torch.Tensor]) -> list[torch.Tensor]:
        """Z = codebook(W + U) per tensor, on the quantizer's integer grid and on the support of W."""
        out = []
        for i, (name, u) in enumerate(zip(self.layer_names, us)):
            layer = model.get_submodule(name)
            w = layer.weight.detach()
            scale, qmax = grid(layer)
            z, self.centers[i] = fit_codebook(w + u.to(w.device), scale, self.codebook_bits, qmax, support=w != 0,
                                              symmetric=self.symmetric, init=self.centers[i])
            out.append(z)
        return out

    @torch.no_grad()
    def dual_step(self, model: nn.Module) -> None:
        """Z <- codebook(W + U), U <- U + W - Z (the scaled dual of the reference's `duplicate_update`)."""
        ws = self.weights(model)
        self.z = self.z_step(model, self.u)
        self.u = [u.to(w.device) + w.detach() - z for u, w, z in zip(self.u, ws, self.z)]
        # Kept for the epoch being trained and the one before (logged at its end): bounded, whatever the run.
        self.residuals = [r for r in self.residuals if r[0] >= self.epoch - 1]
        self.residuals.append((self.epoch, relative_residual(ws, self.z)))

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.finetuning:
            return None
        ws = self.weights(unwrap(model))
        return admm_penalty(ws, self.z, self.u, self.rho)

    def sparse_step(self, model: nn.Module, lr: float) -> None:
        project_global_topk(self.weights(model), self.target)
        self.step_count += 1
        if self.step_count % self.quant_interval == 0:
            self.dual_step(model)

    # -- final phase: mask and Z fixed, W = Z --------------------------------------------------------
    def final_masks(self, model: nn.Module) -> list[torch.Tensor]:
        return global_topk_masks(self.weights(model), self.target)

    def start_finetune(self, model: nn.Module) -> None:
        m = unwrap(model)
        project_global_topk(self.weights(m), self.target)
        self.z = self.z_step(m, self.u)  # the last Z-step, from the quantizer scales the phase keeps
        self.fixed_scales = [p.detach().clone().cpu() for p in self.scale_params(m)]
        super().start_finetune(m)  # masks, then apply_masks: W = Z

    def scale_params(self, model: nn.Module) -> list[torch.Tensor]:
        """The learned weight-quantizer scales of the pruned layers (fixed in the final phase: a moving scale
        would re-round Z off its codebook)."""
        return [p for n in self.layer_names for k, p in model.get_submodule(n).named_parameters()
                if k.startswith("weight_quant.")]

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        m = unwrap(model)
        for w, z in zip(self.weights(m), self.z):
            w.copy_(z.to(w.device))
        for p, s in zip(self.scale_params(m), self.fixed_scales or []):
            p.copy_(s.to(p.device))

    # -- reporting and state -------------------------------------------------------------------------
    def distinct_values(self, model: nn.Module) -> dict[str, int]:
        """Distinct nonzero quantized integers per layer (what the exported tensor holds, up to a spread)."""
        out = {}
        with torch.no_grad():
            for n in self.layer_names:
                layer = model.get_submodule(n)
                qw = layer.quant_weight()
                vals = qw.int() if layer_bits(layer) != FLOAT else qw.value
                out[n] = int(torch.unique(vals[vals != 0]).numel())
        return out

    def stats(self, model: nn.Module) -> dict[str, Any]:
        out = super().stats(model)
        m = unwrap(model)
        ws = self.weights(m)
        out.update({
            "density": sum(int((w != 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws)),
            "w_z_residual": relative_residual(ws, self.z),  # ||W - Z|| / ||W|| now (0 in the final phase)
            # after each Z/U update of the epoch just ended (stats are taken after `end_epoch`)
            "w_z_residual_updates": [round(r, 6) for e, r in self.residuals if e == self.epoch - 1],
            "distinct_nonzero": self.distinct_values(m),
        })
        return out

    def extra_stats(self) -> dict[str, Any]:
        return {"codebook_bits": self.codebook_bits, "rho": self.rho, "quant_interval": self.quant_interval,
                "symmetric": self.symmetric, "admm_updates": self.step_count // self.quant_interval}

    def extra_state(self) -> dict[str, Any]:
        return {"codebook_bits": self.codebook_bits, "rho": self.rho, "quant_interval": self.quant_interval,
                "symmetric": self.symmetric, "step_count": self.step_count,
                "residuals": [[e, r] for e, r in self.residuals],
                "z": [z.cpu() for z in self.z], "u": [u.cpu() for u in self.u],
                "centers": [None if c is None else c.cpu() for c in self.centers],
                "fixed_scales": None if self.fixed_scales is None else [s.clone() for s in self.fixed_scales],
                "weight_masks": self.masks_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.codebook_bits = int(state["codebook_bits"])
        self.rho = float(state["rho"])
        self.quant_interval = int(state["quant_interval"])
        self.symmetric = bool(state["symmetric"])
        self.step_count = int(state["step_count"])
        self.residuals = [(int(e), float(r)) for e, r in state["residuals"]]
        self.z = list(state["z"])
        self.u = list(state["u"])
        self.centers = list(state["centers"])
        self.fixed_scales = None if state["fixed_scales"] is None else list(state["fixed_scales"])
        self.weight_masks = None if state["weight_masks"] is None else [m.bool() for m in state["weight_masks"]]
