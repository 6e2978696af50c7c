"""Low-rank layers (CSTAR, Phan et al., AAAI 2023): Tucker-2 convolutions and SVD linears, and the
projection that finds their factors.

A kxk conv kernel W [Co, Ci, k, k] of Tucker-2 rank (Ro, Ri) is

    W[o, i] = sum_ab Uo[o, a] Ui[i, b] G[a, b]       (G [Ro, Ri, k, k], Uo [Co, Ro], Ui [Ci, Ri])

and runs as three plain convs: 1x1 Ci->Ri (weight Ui^T) -> kxk Ri->Ro (weight G, the original stride,
padding and dilation) -> 1x1 Ro->Co (weight Uo, the original bias). Each conv reads a quantized tensor
(a signed activation quantizer sits between them), as the integer export needs, and the BatchNorm that
followed the dense conv follows the last one, so it still folds. The *folded* form merges the first
1x1 into the core (kxk Ci->Ro, weight G x_1 Ui), *folded-out* the last (kxk Ri->Co, weight G x_0 Uo):
two convs, one requantization fewer. Per layer the form storing the fewest parameters is used, which
also means the fewest MACs (the first 1x1 runs at input resolution, so folding it in saves even more).
A 1x1 conv is a matrix: its Tucker-2 projection with Ri = Ci is the truncated SVD, realized in the
folded form (1x1 Ci->r with the stride, then 1x1 r->Co). A linear layer factorizes the same way
(`LowRankLinear`).

The projection is HOSVD (leading left singular vectors of the mode-0 and mode-1 unfoldings) refined by
HOOI sweeps, in float64 with torch.linalg.svd; tensorly's `partial_tucker(W, modes=(0, 1), init="svd")`
computes the same thing.

Which layers are factorized, with which ranks and form, is a plain dict (`structure`), stored in the
checkpoint's model spec so that resume, export and bench rebuild the same modules (`factorize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import brevitas.nn as qnn
import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.quant.presets import SIGNED_ACT_QUANT, WEIGHT_QUANT
from rcdeploy.quant.spec import QuantSpec, layer_bits, set_module

HOOI_SWEEPS = 10  # HOOI iterations at most (stops earlier once the fit stops improving)

# Realizations of one layer: three convs, two convs (the first or the last 1x1 folded into the core), unchanged.
TUCKER, FOLDED, FOLDED_OUT, DENSE = "tucker", "folded", "folded-out", "dense"


# -- the projection ---------------------------------------------------------------------------------------


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading left singular vectors of a wide matrix (columns): eigenvectors of the small Gram
    matrix m m^T, which is much faster than an SVD of m (512 x 4608 for a ResNet-18 kernel) in float64."""
    if m.shape[0] > m.shape[1]:
        u, _, _ = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r]
    _, vecs = torch.linalg.eigh(m @ m.T)  # ascending eigenvalues
    return vecs.flip(1)[:, :r]


def tucker2(w: torch.Tensor, ranks: Sequence[int], sweeps: int = HOOI_SWEEPS
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, Uo, Ui) of the Tucker-2 projection of `w` [Co, Ci, ...] onto ranks (Ro, Ri); float64, orthonormal
    factors. A rank at or above the mode's size keeps that mode whole (an identity factor)."""
    w = w.detach().to(torch.float64)
    co, ci = w.shape[:2]
    ro, ri = min(int(ranks[0]), co), min(int(ranks[1]), ci)
    if ro < 1 or ri < 1:
        raise ValueError(f"Tucker-2 ranks must be >= 1, got {tuple(ranks)}")
    eye_o, eye_i = ro == co, ri == ci
    area = math.prod(w.shape[2:])
    if (not eye_o and not eye_i) and (ro > ri * area or ri > ro * area):
        raise ValueError(f"Tucker-2 ranks {(ro, ri)} of a {tuple(w.shape)} kernel: a mode's rank cannot exceed "
                         "the other's times the kernel area")
    uo = torch.eye(co, dtype=w.dtype, device=w.device) if eye_o else _leading(w.reshape(co, -1), ro)
    ui = torch.eye(ci, dtype=w.dtype, device=w.device) if eye_i else _leading(w.transpose(0, 1).reshape(ci, -1), ri)
    fit = -1.0
    for _ in range(0 if eye_o or eye_i else sweeps):  # with one mode whole, HOSVD is already optimal
        uo = _leading(torch.einsum("oi...,ib->ob...", w, ui).reshape(co, -1), ro)
        ui = _leading(torch.einsum("oi...,oa->ia...", w, uo).reshape(ci, -1), ri)
        # ||G||^2 is the captured energy (orthonormal factors); HOOI never lowers it: stop once it settles.
        new_fit = float(torch.einsum("oi...,oa,ib->ab...", w, uo, ui).square().sum())
        if new_fit <= fit * (1 + 1e-12):
            break
        fit = new_fit
    # A zero output (input) slice of W is a pruned channel: its factor row is 0 in exact arithmetic, and
    # setting it so keeps the channel exactly zero through the factors (export --prune-channels removes it).
    if not eye_o:
        uo[zero_slices(w, 0)] = 0
    if not eye_i:
        ui[zero_slices(w, 1)] = 0
    core = torch.einsum("oi...,oa,ib->ab...", w, uo, ui)
    return core, uo, ui


def zero_slices(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Bool per index of `mode` (0: output, 1: input channels): the slices of `w` that are all zero."""
    return w.transpose(0, mode).reshape(w.shape[mode], -1).abs().amax(1) == 0


def reconstruct(core: torch.Tensor, uo: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
    """G x_0 Uo x_1 Ui."""
    return torch.einsum("ab...,oa,ib->oi...", core, uo, ui)


def project(w: torch.Tensor, ranks: Sequence[int], sweeps: int = HOOI_SWEEPS) -> torch.Tensor:
    """The Tucker-2 projection of `w` onto ranks (Ro, Ri), in `w`'s dtype and device."""
    return reconstruct(*tucker2(w, ranks, sweeps)).to(w.dtype)


def relative_residual(w: torch.Tensor, ranks: Sequence[int]) -> float:
    """||W - Proj(W)|| / ||W||."""
    w64 = w.detach().to(torch.float64)
    return float((w64 - project(w64, ranks)).norm() / w64.norm().clamp_min(1e-30))


def mode_energies(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized singular-value energies s_j^2 / ||W||^2 of the mode-0 and mode-1 unfoldings (float64, CPU)."""
    w = w.detach().to(torch.float64).cpu()
    total = float((w * w).sum()) or 1.0
    s0 = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    s1 = torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1))
    return s0 ** 2 / total, s1 ** 2 / total


# -- sizes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What sizes a dense conv (k x k) or linear (k = 0) layer: enough to cost any factorization of it."""

    out_ch: int
    in_ch: int
    k: int = 0  # kernel height * width for convs; 0 for a linear layer

    @property
    def area(self) -> int:
        return max(self.k, 1)

    @property
    def matrix(self) -> bool:
        """A 1x1 conv or a linear layer: factorized by SVD (one rank), never in three parts."""
        return self.area == 1

    def caps(self) -> tuple[int, int]:
        """Largest useful (Ro, Ri): a mode's rank is bounded by both sides of its unfolding."""
        co, ci, a = self.out_ch, self.in_ch, self.area
        if self.matrix:
            return min(co, ci), ci
        return min(co, ci * a), min(ci, co * a)

    def dense_params(self) -> int:
        """Weights + one bias per output channel (what the export stores once BatchNorm is folded)."""
        return self.out_ch * self.in_ch * self.area + self.out_ch

    def params(self, form: str, ro: int, ri: int) -> int:
        co, ci, a = self.out_ch, self.in_ch, self.area
        if form == DENSE:
            return self.dense_params()
        if form == FOLDED:
            return ro * ci * a + ro + co * ro + co
        if form == FOLDED_OUT:
            return ri * ci + ri + co * ri * a + co
        return ri * ci + ri + ro * ri * a + ro + co * ro + co

    def best(self, ro: int, ri: int) -> tuple[str, int]:
        """(form, params) of the cheapest realization at ranks (Ro, Ri); ties go to fewer convs."""
        options = [(self.params(DENSE, ro, ri), 0, DENSE), (self.params(FOLDED, ro, ri), 1, FOLDED)]
        if not self.matrix:
            options += [(self.params(FOLDED_OUT, ro, ri), 2, FOLDED_OUT), (self.params(TUCKER, ro, ri), 3, TUCKER)]
        params, _, form = min(options)
        return form, params

    def macs(self, form: str, ro: int, ri: int, in_hw: int, out_hw: int) -> int:
        """Multiply-accumulates per image (in_hw, out_hw: input and output pixels; 1 for linears)."""
        co, ci, a = self.out_ch, self.in_ch, self.area
        if form == DENSE:
            return co * ci * a * out_hw
        if form == FOLDED:
            return (ro * ci * a + co * ro) * out_hw
        if form == FOLDED_OUT:
            return ri * ci * in_hw + co * ri * a * out_hw
        return ri * ci * in_hw + (ro * ri * a + co * ro) * out_hw


# -- the modules -------------------------------------------------------------------------------------------


def _conv(spec: QuantSpec, bits: int, in_ch: int, out_ch: int, kernel: Any, stride: Any = 1, padding: Any = 0,
          dilation: Any = 1, bias: bool = False) -> qnn.QuantConv2d:
    return qnn.QuantConv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                           weight_quant=WEIGHT_QUANT[bits])


class TuckerConv(nn.Module):
    """A Tucker-2 conv: 1x1 Ci->Ri -> quant -> kxk Ri->Ro -> quant -> 1x1 Ro->Co (form "tucker"); "folded"
    drops the first 1x1 (core Ci->Ro, weight G x_1 Ui), "folded-out" the last (core Ri->Co, weight G x_0 Uo).

    Plain Brevitas layers in sequence (fx traces through this module), so the integer export writes
    each as its own QLinearConv and the next BatchNorm folds into the last of them.
    """

    def __init__(self, spec: QuantSpec, bits: int, in_ch: int, out_ch: int, kernel: Any, ranks: Sequence[int],
                 *, stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = False,
                 form: str = TUCKER) -> None:
        super().__init__()
        if form not in (TUCKER, FOLDED, FOLDED_OUT):
            raise ValueError(f"TuckerConv form {form!r}")
        ro, ri = int(ranks[0]), int(ranks[1])
        self.in_channels, self.out_channels, self.ranks, self.form = in_ch, out_ch, (ro, ri), form
        act = SIGNED_ACT_QUANT[spec.act_bits]
        self.first: nn.Module | None = None
        self.q1: nn.Module | None = None
        self.q2: nn.Module | None = None
        self.last: nn.Module | None = None
        if form != FOLDED:
            self.first = _conv(spec, bits, in_ch, ri, 1)
            self.q1 = qnn.QuantIdentity(act_quant=act)
        core_in, core_out = (in_ch if form == FOLDED else ri), (out_ch if form == FOLDED_OUT else ro)
        self.core = _conv(spec, bits, core_in, core_out, kernel, stride, padding, dilation,
                          bias=bias and form == FOLDED_OUT)
        if form != FOLDED_OUT:
            self.q2 = qnn.QuantIdentity(act_quant=act)
            self.last = _conv(spec, bits, ro, out_ch, 1, bias=bias)

    @property
    def folded(self) -> bool:
        return self.form == FOLDED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is not None:
            x = self.q1(self.first(x))
        x = self.core(x)
        if self.last is not None:
            x = self.last(self.q2(x))
        return x

    @torch.no_grad()
    def load_factors(self, core: torch.Tensor, uo: torch.Tensor, ui: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set the float weights from the factors of a Tucker-2 projection (G, Uo, Ui) and the dense bias."""
        dt = self.core.weight.dtype
        if self.first is not None:
            self.first.weight.copy_(ui.t().reshape(*ui.t().shape, 1, 1).to(dt))
        else:
            core = torch.einsum("ab...,ib->ai...", core, ui)
        if self.last is not None:
            self.last.weight.copy_(uo.reshape(*uo.shape, 1, 1).to(dt))
        else:
            core = torch.einsum("oa,ab...->ob...", uo, core)
        self.core.weight.copy_(core.to(dt))
        out = self.last if self.last is not None else self.core
        if bias is not None:
            out.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        """The kernel this module computes with its float weights (for tests and reports)."""
        w = self.core.weight
        if self.first is not None:
            w = torch.einsum("abhw,bi->aihw", w, self.first.weight[:, :, 0, 0])
        if self.last is not None:
            w = torch.einsum("oa,aihw->oihw", self.last.weight[:, :, 0, 0], w)
        return w


class LowRankLinear(nn.Module):
    """A linear layer as two: Ci -> r -> quant -> r -> Co (truncated SVD, sqrt(S) on both sides)."""

    def __init__(self, spec: QuantSpec, bits: int, in_f: int, out_f: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.ranks = in_f, out_f, (int(rank), in_f)
        self.core = qnn.QuantLinear(in_f, rank, bias=False, weight_quant=WEIGHT_QUANT[bits])
        self.q2 = qnn.QuantIdentity(act_quant=SIGNED_ACT_QUANT[spec.act_bits])
        self.last = qnn.QuantLinear(rank, out_f, bias=bias, weight_quant=WEIGHT_QUANT[bits])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.q2(self.core(x)))

    @torch.no_grad()
    def load_svd(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        w64 = w.detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        u[zero_slices(w64, 0)] = 0  # pruned channels stay exactly zero (see tucker2)
        vh[:, zero_slices(w64, 1)] = 0
        r = self.ranks[0]
        root = s[:r].sqrt()
        self.core.weight.copy_((root[:, None] * vh[:r]).to(self.core.weight.dtype))
        self.last.weight.copy_((u[:, :r] * root[None]).to(self.last.weight.dtype))
        if bias is not None:
            self.last.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        return self.last.weight @ self.core.weight


LOW_RANK_TYPES = (TuckerConv, LowRankLinear)


# -- structure: which layers, which ranks -------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """How one dense layer is realized: its form and ranks (Ro, Ri)."""

    form: str
    ranks: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> LayerPlan:
        try:
            form, ranks = str(d["form"]), tuple(int(r) for r in d["ranks"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{where}: a low-rank layer needs a form and two ranks") from None
        if form not in (TUCKER, FOLDED, FOLDED_OUT, DENSE) or len(ranks) != 2 or min(ranks) < 1:
            raise UsageError(f"{where}: bad low-rank layer {d!r}")
        return cls(form, (ranks[0], ranks[1]))


def low_rank_module(layer: nn.Module, plan: LayerPlan, spec: QuantSpec) -> nn.Module:
    """An untrained factorized module shaped like `plan`, replacing the dense `layer` (same bits, device)."""
    bits = layer_bits(layer)
    ro, ri = plan.ranks
    if isinstance(layer, qnn.QuantLinear):
        new: nn.Module = LowRankLinear(spec, bits, layer.in_features, layer.out_features, ro,
                                       bias=layer.bias is not None)
    else:
        if layer.groups != 1 or isinstance(layer.padding, str):
            raise UsageError("low rank: only plain (groups=1, numeric padding) convolutions factorize")
        new = TuckerConv(spec, bits, layer.in_channels, layer.out_channels, layer.kernel_size, (ro, ri),
                         stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                         bias=layer.bias is not None, form=plan.form)
    return new.to(layer.weight.device).train(layer.training)


@torch.no_grad()
def factorized_from(layer: nn.Module, plan: LayerPlan, spec: QuantSpec) -> nn.Module:
    """The factorized module initialized from the Tucker-2 projection (or SVD) of `layer`'s float weights."""
    new = low_rank_module(layer, plan, spec)
    bias = layer.bias.detach() if layer.bias is not None else None
    if isinstance(new, LowRankLinear):
        new.load_svd(layer.weight, bias)
    else:
        new.load_factors(*tucker2(layer.weight, plan.ranks), bias)
    return new


def factorize(model: nn.Module, structure: dict[str, Any], spec: QuantSpec) -> nn.Module:
    """Replace the layers `structure["layers"]` names (non-dense forms) by untrained factorized modules of
    that shape, in place; the weights come from a state dict afterwards (checkpoint rebuild)."""
    layers = structure.get("layers") if isinstance(structure, dict) else None
    if not isinstance(layers, dict):
        raise UsageError("low_rank: expected {'layers': {name: {'form': ..., 'ranks': [Ro, Ri]}}}")
    for name, d in layers.items():
        plan = LayerPlan.from_dict(d, f"low_rank layer {name}")
        if plan.form == DENSE:
            continue
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"low_rank: the model has no layer {name!r}") from None
        if not isinstance(layer, (qnn.QuantConv2d, qnn.QuantLinear)):
            raise UsageError(f"low_rank: layer {name!r} is a {type(layer).__name__}, not a conv or linear layer")
        set_module(model, name, low_rank_module(layer, plan, spec))
    return model


def low_rank_report(model: nn.Module, layer_rows: list[dict[str, Any]], structure: dict[str, Any] | None = None
                    ) -> dict[str, Any] | None:
    """The factorized layers of an exported model: ranks, form, params and MACs against their dense
    originals, from the export's layer table (params as stored: weights + folded biases). Layers the
    allocation (`structure`) kept dense count on both sides, as the budget counted them. None if none."""
    rows = {r["name"]: r for r in layer_rows}
    out: dict[str, Any] = {}
    for name, d in ((structure or {}).get("layers") or {}).items():
        if d.get("form") == DENSE and name in rows:
            r = rows[name]
            out[name] = {"form": DENSE, "ranks": list(d.get("ranks", [])), "params": int(r.get("params", 0)),
                         "dense_params": int(r.get("params", 0)), "macs": int(r.get("macs") or 0),
                         "dense_macs": int(r.get("macs") or 0)}
    for name, m in model.named_modules():
        if not isinstance(m, LOW_RANK_TYPES):
            continue
        parts = [rows[f"{name}.{p}"] for p in ("first", "core", "last") if f"{name}.{p}" in rows]
        if isinstance(m, TuckerConv):
            kh, kw = m.core.kernel_size
            geo = Geometry(m.out_channels, m.in_channels, kh * kw)
        else:
            geo = Geometry(m.out_features, m.in_features, 0)
        out_row = rows.get(f"{name}.last") or rows.get(f"{name}.core") or {}  # the part that writes the output
        per_pixel = int(out_row.get("out_channels") or 0) * int(out_row.get("in_channels") or 0) * math.prod(
            out_row.get("kernel") or [1])
        out_hw = (out_row.get("macs") or 0) // max(1, per_pixel)
        out[name] = {"form": getattr(m, "form", FOLDED), "ranks": list(m.ranks),
                     "params": sum(int(p.get("params", 0)) for p in parts), "dense_params": geo.dense_params(),
                     "macs": sum(int(p.get("macs") or 0) for p in parts),
                     "dense_macs": geo.out_ch * geo.in_ch * geo.area * out_hw}
    if not any(v["form"] != DENSE for v in out.values()):
        return None
    params, dense = sum(v["params"] for v in out.values()), sum(v["dense_params"] for v in out.values())
    macs, dense_macs = sum(v["macs"] for v in out.values()), sum(v["dense_macs"] for v in out.values())
    return {"layers": out, "params": params, "dense_params": dense, "ratio": dense / max(1, params),
            "macs": macs, "dense_macs": dense_macs, "mac_ratio": dense_macs / max(1, macs)}
