"""Unstructured weight sparsity: RVSM and ADMM, as `--sparsity rvsm|admm` next to the channel methods
(ATMC, `rcdeploy.train.atmc`, builds on the same base and on the global projection here).

Both work on the float weights of every conv and linear layer (quantizers map a zero weight to zero,
except binary ones, where a zero weight still becomes +-scale) and end, like the channel methods, with
a fine-tune phase in which the pruned weights are held at zero. They prune single weights, so they
shrink a file only through compression, not through `export --prune-channels`; they are here to
reproduce the papers' comparisons (Dinh, Wang, Bertozzi, Osher, Xin, arXiv 2003.00631), which report

* weight sparsity: the share of exactly-zero conv and linear weights;
* channel sparsity: the share of conv filters (output channels) whose weight norm is below 1e-15.

RVSM (relaxed variable splitting; Dinh and Xin 2018): minimise f(w) + lambda ||u||_0 + beta/2 ||w - u||^2;
u is the L0 prox of w, hard thresholding at sqrt(2 lambda / beta), recomputed after every step; the
loss carries beta/2 ||w - u||^2; w <- u at the end of every epoch. Paper defaults beta 1e-2, lambda 1e-6.

ADMM (Zhang et al. 2018): minimise f(w) subject to w having at most (1 - target) nonzeros per layer;
the loss carries rho/2 ||w - z + v||^2, and at the end of every epoch z <- Proj(w + v), v <- v + w - z.
Proj keeps the largest entries by *magnitude* (both signs); the reference code ranks signed values, a
bug that prunes every negative weight first. When the mask is fixed, w is projected the same way.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import brevitas.nn as qnn
import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.models.channels import unwrap
from rcdeploy.names import SPARSITY, WEIGHTS
from rcdeploy.quant.spec import layer_bits, weight_layers
from rcdeploy.train.admm import admm_penalty
from rcdeploy.train.sparsity import Sparsity, register_sparsity

ZERO_NORM = 1e-15  # a filter counts as removed below this norm (the papers' definition)
UNSTRUCTURED = tuple(SPARSITY.names(kind=WEIGHTS))  # the weight (not channel) methods: rvsm, admm, atmc


def hard_threshold(w: torch.Tensor, lam: float, beta: float) -> torch.Tensor:
    """Prox of lam ||u||_0 + beta/2 ||u - w||^2: keep entries with |w| > sqrt(2 lam / beta), zero the rest."""
    thr = math.sqrt(2 * lam / beta)
    return torch.where(w.abs() > thr, w, torch.zeros_like(w))


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask, True where pruned: all but the ceil((1 - sparsity) * n) largest |w| (ties broken by index)."""
    n = w.numel()
    keep = min(n, max(0, math.ceil((1 - sparsity) * n - 1e-9)))
    mask = torch.ones(n, dtype=torch.bool, device=w.device)
    if keep:
        mask[torch.topk(w.detach().abs().flatten(), keep, sorted=False).indices] = False
    return mask.view_as(w)


def project_topk(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Euclidean projection onto {at most (1 - sparsity) * n nonzeros}: keep the largest |w|, both signs."""
    return w.masked_fill(magnitude_mask(w, sparsity), 0.0)


def global_topk_masks(ws: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Bool masks, True where pruned: ONE budget over all tensors, keeping the ceil((1 - sparsity) * N)
    largest |w| of them all (N = all their entries), whatever tensor each lives in (ATMC's projection;
    magnitudes are compared unnormalized, as in its reference code)."""
    flat = torch.cat([w.detach().abs().flatten().float() for w in ws])
    n = flat.numel()
    keep = min(n, max(0, math.ceil((1 - sparsity) * n - 1e-9)))
    pruned = torch.ones(n, dtype=torch.bool, device=flat.device)
    if keep:
        pruned[torch.topk(flat, keep, sorted=False).indices] = False
    return [m.view_as(w) for m, w in zip(torch.split(pruned, [w.numel() for w in ws]), ws)]


@torch.no_grad()
def project_global_topk(ws: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """In place: zero all but the globally largest |w| (`global_topk_masks`); returns the masks."""
    masks = global_topk_masks(ws, sparsity)
    for w, m in zip(ws, masks):
        w.masked_fill_(m.to(w.device), 0.0)
    return masks


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """The papers' figures: weight sparsity (conv + linear) and channel sparsity (conv filters, norm < 1e-15),
    counted as the seed-002 code counts them: on the float weights, and (`quantized_channel_sparsity`) on
    the quantized weights the model computes with, where a row can round to zero while its float is not."""
    zeros = total = dead = dead_q = filters = 0
    for _, layer in weight_layers(unwrap(model)):
        w = layer.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
        if isinstance(layer, qnn.QuantConv2d):
            norms = w.reshape(w.shape[0], -1).double().norm(dim=1)
            dead += int((norms < ZERO_NORM).sum())
            with torch.no_grad():
                qw = layer.quant_weight()
            qw = getattr(qw, "value", qw).detach()
            dead_q += int((qw.reshape(qw.shape[0], -1).double().norm(dim=1) < ZERO_NORM).sum())
            filters += w.shape[0]
    return {"weight_sparsity": zeros / max(1, total), "paper_channel_sparsity": dead / max(1, filters),
            "quantized_channel_sparsity": dead_q / max(1, filters)}


class _Unstructured(Sparsity):
    """Shared part: the weights pruned, the fixed weight masks of the fine-tune phase, the paper's stats."""

    def __init__(self, model: nn.Module, *, target: float, **kw: Any) -> None:
        super().__init__(model, target=target, **kw)
        m = unwrap(model)
        self.layer_names = [name for name, _ in weight_layers(m)]
        binary = [name for name, layer in weight_layers(m) if layer_bits(layer) == 1]
        if binary:
            warnings.warn(f"{self.name}: binary layers ({', '.join(binary[:3])}) quantize a zero weight to "
                          "+-scale, so their pruned weights are not zero in the deployed model", stacklevel=3)
        self.weight_masks: list[torch.Tensor] | None = None  # per layer, True = pruned; set by start_finetune

    @property
    def finetuning(self) -> bool:
        return self.weight_masks is not None

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [model.get_submodule(n).weight for n in self.layer_names]

    def final_masks(self, model: nn.Module) -> list[torch.Tensor]:
        raise NotImplementedError

    def start_finetune(self, model: nn.Module) -> None:
        model = unwrap(model)
        self.weight_masks = [m.cpu() for m in self.final_masks(model)]
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        for w, mask in zip(self.weights(unwrap(model)), self.weight_masks or []):
            w.masked_fill_(mask.to(w.device), 0.0)

    def stats(self, model: nn.Module) -> dict[str, Any]:
        out = super().stats(model)
        out.update(sparsity_report(model))
        return out

    def masks_state(self) -> list[torch.Tensor] | None:
        return None if self.weight_masks is None else [m.clone() for m in self.weight_masks]


@register_sparsity("rvsm")
class RVSM(_Unstructured):
    """Relaxed variable splitting with the L0 penalty (see the module docstring). `target` is only reported:
    lambda / beta set a magnitude threshold, not a share."""

    name = "rvsm"

    def __init__(self, model: nn.Module, *, target: float = 0.0, beta: float = 1e-2, lam: float = 1e-6,
                 **kw: Any) -> None:
        super().__init__(model, target=target, **kw)
        if beta <= 0 or lam < 0:
            raise UsageError("RVSM needs beta > 0 and lam >= 0")
        self.beta = float(beta)
        self.lam = float(lam)
        self.u: list[torch.Tensor] = []
        self.update_u(unwrap(model))

    @property
    def threshold(self) -> float:
        return math.sqrt(2 * self.lam / self.beta)

    @torch.no_grad()
    def update_u(self, model: nn.Module) -> None:
        self.u = [hard_threshold(w.detach(), self.lam, self.beta) for w in self.weights(model)]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.finetuning:
            return None
        ws = self.weights(unwrap(model))
        return (self.beta / 2) * sum(((w - u.to(w.device)) ** 2).sum() for w, u in zip(ws, self.u))

    def sparse_step(self, model: nn.Module, lr: float) -> None:
        self.update_u(model)

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        if not self.finetuning:
            m = unwrap(model)
            for w, u in zip(self.weights(m), self.u):
                w.copy_(u.to(w.device))
            self.update_u(m)
        super().end_epoch(model, epoch, epochs)

    def final_masks(self, model: nn.Module) -> list[torch.Tensor]:
        return [hard_threshold(w.detach(), self.lam, self.beta) == 0 for w in self.weights(model)]

    def extra_stats(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def extra_state(self) -> dict[str, Any]:
        return {"beta": self.beta, "lam": self.lam, "u": [u.cpu() for u in self.u], "weight_masks": self.masks_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.lam = float(state["lam"])
        self.u = list(state["u"])
        self.weight_masks = None if state["weight_masks"] is None else [m.bool() for m in state["weight_masks"]]


@register_sparsity("admm")
class ADMM(_Unstructured):
    """ADMM pruning to `target` weight sparsity per layer (see the module docstring)."""

    name = "admm"

    def __init__(self, model: nn.Module, *, target: float, rho: float = 1e-2, **kw: Any) -> None:
        if not 0 < target < 1:
            raise UsageError(f"ADMM prunes to a weight-sparsity target: pass --prune-weights in (0, 1), got {target}")
        super().__init__(model, target=target, **kw)
        if rho <= 0:
            raise UsageError("ADMM needs rho > 0")
        self.rho = float(rho)
        with torch.no_grad():
            ws = self.weights(unwrap(model))
            self.z = [project_topk(w.detach(), self.target) for w in ws]
            self.v = [torch.zeros_like(w) for w in ws]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.finetuning:
            return None
        ws = self.weights(unwrap(model))
        return admm_penalty(ws, self.z, self.v, self.rho)

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        if not self.finetuning:
            for i, w in enumerate(self.weights(unwrap(model))):
                v = self.v[i].to(w.device)
                self.z[i] = project_topk(w.detach() + v, self.target)
                self.v[i] = v + w.detach() - self.z[i]
        super().end_epoch(model, epoch, epochs)

    def final_masks(self, model: nn.Module) -> list[torch.Tensor]:
        return [magnitude_mask(w, self.target) for w in self.weights(model)]

    def extra_stats(self) -> dict[str, Any]:
        return {"rho": self.rho}

    def extra_state(self) -> dict[str, Any]:
        return {"rho": self.rho, "z": [z.cpu() for z in self.z], "v": [v.cpu() for v in self.v],
                "weight_masks": self.masks_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rho = float(state["rho"])
        self.z = list(state["z"])
        self.v = list(state["v"])
        self.weight_masks = None if state["weight_masks"] is None else [m.bool() for m in state["weight_masks"]]
