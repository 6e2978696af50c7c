"""CSTAR training (Phan, Yin, Sui, Yuan, Zonouz, AAAI 2023): global Tucker-2 ranks to a compression
budget, ADMM towards them inside adversarial training, then the hard swap to factorized layers.

The paper's schedule, rho and rank criterion are not public (docs: METHODS.md section 1); ours:

1. dense adversarial training for the first `rank_admm_at` share of the epochs (0.3), so that the
   ranks are chosen from trained weights, not from an isotropic initialization;
2. at the start of the next epoch, global rank selection (`allocate`) on the current weights, once;
3. ADMM until the `rank_swap_at` share (0.7): loss += rho/2 sum_l ||W_l - Z_l + U_l||^2, and after every
   epoch Z_l <- Proj(W_l + U_l), U_l <- U_l + W_l - Z_l (once per epoch, as METHODS.md 1.4 proposes).
   rho (default 1e-2, `--rank-rho`) is ten times METHODS.md's proposal of 1e-3: our runs are tens of
   epochs, not hundreds, and with SGD momentum 0.9 and lr 0.1 it contracts W - Z by about 1% per step
   (short CPU runs need more: the digits tests and the short recipe use 0.1 and 0.03);
4. at the end of that epoch the hard swap: every chosen layer becomes a `TuckerConv` (or SVD pair)
   initialized from Proj(W), its new activation quantizers calibrated on the inputs the layer saw in
   that epoch; the optimizer restarts (fresh momentum) on the new parameters;
5. adversarial fine-tuning of the factors for the remaining epochs; only these (factorized) epochs may
   become best.pt.

With channel sparsity (`--prune-channels`) the mask is fixed when step 3 starts (loop.finetune_epoch): the
input columns that read pruned channels are zeroed (they multiply zeros), every layer is allocated at its
remaining shape (`remaining`), the projection keeps zero channels exactly zero, and after the swap the
sparsity plugin traces the factorized model's channel groups again, keeping exactly the zero channels masked.

Ranks: greedy by normalized singular-value energy (s_j^2 / ||W||^2, weighted by the layer's share of the
dense parameters) gained per stored parameter (weights + biases, as the export stores them), in steps of
`--channel-multiple`; a step that gains no energy (beyond an exactly low-rank layer's rank) is never
taken. Each layer takes the form (three convs, first or last 1x1 folded, or dense) that stores the fewest
parameters at its ranks. The greedy path is computed once without a budget and cut before the first step
that would exceed it: a larger ratio never raises any rank, and the ratio is met within one rank step.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import brevitas.nn as qnn
import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.models.tucker import (
    DENSE,
    LOW_RANK_TYPES,
    Geometry,
    LayerPlan,
    factorized_from,
    mode_energies,
    project,
    zero_slices,
)
from rcdeploy.quant.calibrate import init_weight_scales
from rcdeploy.quant.spec import QuantSpec, set_module, weight_layers
from rcdeploy.train.admm import admm_penalty

ZERO_GAIN = 1e-10  # normalized energy below this is rounding noise: an exactly low-rank layer stops there
CALIB_IMAGES = 64  # inputs kept per layer (last training batch before the swap) to calibrate its new quantizers


# -- global rank selection --------------------------------------------------------------------------------


@dataclass
class Allocation:
    """Chosen ranks and forms of the candidate layers, with the budget arithmetic."""

    plans: dict[str, LayerPlan]
    geometry: dict[str, Geometry]
    ratio_asked: float
    params: int = 0
    dense_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.dense_params / max(1, self.params)

    def structure(self) -> dict[str, Any]:
        """The model-spec form (`rcdeploy.models.tucker.factorize`)."""
        return {"ratio": self.ratio_asked, "layers": {n: p.to_dict() for n, p in self.plans.items()}}

    def report(self) -> dict[str, Any]:
        layers = {}
        for n, p in self.plans.items():
            g = self.geometry[n]
            layers[n] = {**p.to_dict(), "shape": [g.out_ch, g.in_ch, g.area], "params": g.params(p.form, *p.ranks),
                         "dense_params": g.dense_params()}
        return {"ratio_asked": self.ratio_asked, "ratio": self.ratio, "params": self.params,
                "dense_params": self.dense_params, "layers": layers}


def allocate(weights: dict[str, torch.Tensor], ratio: float, multiple: int = 1) -> Allocation:
    """Ranks for every layer in `weights` (name -> conv [Co, Ci, k, k] or linear [Co, Ci] weight) so that
    their stored parameters are at most dense / `ratio`, chosen greedily by normalized energy per parameter.

    Every layer starts at ranks `multiple` (or its mode size, if smaller); the cheapest realization at
    given ranks is taken (three convs, two, or dense when factorizing saves nothing).
    """
    if ratio <= 1:
        raise UsageError(f"--low-rank {ratio:g}: the ratio must be above 1")
    multiple = max(1, int(multiple))
    names = list(weights)
    geos = {n: Geometry(int(w.shape[0]), int(w.shape[1]), int(math.prod(w.shape[2:])) if w.dim() > 2 else 0)
            for n, w in weights.items()}
    energy = {n: mode_energies(w if w.dim() > 2 else w[:, :, None]) for n, w in weights.items()}
    ranks: dict[str, list[int]] = {}
    for n in names:
        caps = geos[n].caps()
        ranks[n] = [min(multiple, caps[0]), caps[1] if geos[n].matrix else min(multiple, caps[1])]
    dense_total = sum(g.dense_params() for g in geos.values())
    budget = dense_total / ratio
    # Each layer's normalized energy counts by its share of the dense parameters: the greedy minimizes the
    # parameter-weighted mean relative error bound. Unweighted, every small layer would win every step and be
    # kept dense while the large ones are crushed (seen on ResNet-20); weighted, flat spectra give one uniform
    # ratio and rank moves to the layers whose spectra decay fastest.
    weight = {n: geos[n].dense_params() / dense_total for n in names}

    def cost(n: str, r: Sequence[int]) -> int:
        return geos[n].best(r[0], r[1])[1]

    def step(n: str, mode: int) -> tuple[float, int, list[int]] | None:
        """(energy gained, parameters spent, new ranks) of the next rank increment of one mode."""
        if mode == 1 and geos[n].matrix:
            return None
        r, caps = ranks[n], geos[n].caps()
        cap = caps[mode]
        if not geos[n].matrix and r[1 - mode] < caps[1 - mode]:
            cap = min(cap, r[1 - mode] * geos[n].area)  # Tucker-2: a mode's rank is at most the other's times k*k
        if r[mode] >= cap:
            return None
        new = list(r)
        new[mode] = min(cap, (r[mode] // multiple + 1) * multiple)
        gain = float(energy[n][mode][r[mode]:new[mode]].sum()) * weight[n]
        if gain <= ZERO_GAIN:
            return None
        return gain, cost(n, new) - cost(n, r), new

    def push(heap: list, n: str) -> None:
        for mode in (0, 1):
            s = step(n, mode)
            if s is not None:
                gain, spent, _ = s
                # max-heap on gain per parameter; a free step (the layer is stored dense anyway) goes first
                key = -math.inf if spent <= 0 else -gain / spent
                heapq.heappush(heap, (key, names.index(n), mode, tuple(ranks[n])))

    total = sum(cost(n, ranks[n]) for n in names)
    if total > budget:
        raise UsageError(f"--low-rank {ratio:g}x cannot be reached: the smallest ranks (--channel-multiple "
                         f"{multiple}) already store {total:,} of {dense_total:,} parameters "
                         f"({dense_total / total:.1f}x); ask for less or use a smaller --channel-multiple")
    heap: list = []
    for n in names:
        push(heap, n)
    # The whole greedy path, cut at the first step that would exceed the budget: a prefix of one path,
    # so a larger ratio (smaller budget) can only stop earlier and never raises a rank.
    while heap:
        _, i, mode, seen = heapq.heappop(heap)
        n = names[i]
        if tuple(ranks[n]) != seen:
            continue  # stale entry: this layer's ranks moved since it was pushed
        s = step(n, mode)
        if s is None:
            continue
        _, spent, new = s
        if total + spent > budget:
            break
        ranks[n], total = new, total + spent
        push(heap, n)
    plans = {}
    for n in names:
        form, _ = geos[n].best(*ranks[n])
        caps = geos[n].caps()
        plans[n] = LayerPlan(form, (caps[0], caps[1]) if form == DENSE else (ranks[n][0], ranks[n][1]))
    alloc = Allocation(plans, geos, ratio, params=total, dense_params=dense_total)
    if alloc.ratio > ratio * 1.03:
        alloc.notes.append(f"the layers are nearly exactly low-rank: {alloc.ratio:.2f}x reached (asked {ratio:g}x)")
    return alloc


def remaining(w: torch.Tensor) -> torch.Tensor:
    """`w` without its all-zero output rows and input columns (pruned channels): the shape it is stored at."""
    rows, cols = ~zero_slices(w, 0), ~zero_slices(w, 1)
    if not rows.any() or not cols.any():
        return w  # a fully zero layer: nothing to compact to (allocation keeps its smallest ranks)
    return w[rows][:, cols]


# -- the training plugin ----------------------------------------------------------------------------------


def candidate_layers(model: nn.Module, keep_dense: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Dense conv (groups 1) and linear layers to factorize: all but stems and classifiers (the stem reads the
    3 image channels, a classifier has few outputs: low rank saves nothing there) and `keep_dense` patterns.
    A stem is a conv reading as many channels as the first layer, a classifier a linear layer with as many
    outputs as the last: an ensemble (EnResNet) has one of each per member."""
    layers = weight_layers(model)
    if len(layers) < 3:
        return []
    image_ch, classes = layers[0][1].in_channels, layers[-1][1].out_features

    def wanted(n: str, m: nn.Module) -> bool:
        if isinstance(m, qnn.QuantLinear):
            return m.out_features != classes
        return m.groups == 1 and not isinstance(m.padding, str) and m.in_channels != image_ch

    return [(n, m) for n, m in layers[1:-1]
            if wanted(n, m) and not any(fnmatch.fnmatchcase(n, p) for p in keep_dense)]


def _low_rank_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)]


def phase_epochs(epochs: int, admm_at: float, swap_at: float) -> tuple[int, int]:
    """(first ADMM epoch, first factorized epoch). The swap happens at the end of the epoch before the
    latter, so at least one epoch (the last) is trained or ends factorized."""
    swap = min(epochs, max(1, round(epochs * swap_at)))
    admm = min(swap - 1, max(0, round(epochs * admm_at)))
    return admm, swap


class LowRank:
    """The CSTAR phases as a fit-loop plugin (see the module docstring for the schedule).

    Loop protocol: `start_epoch`, `penalty`, `end_epoch` (True when it rebuilt layers: the loop then takes
    `spec_kwargs()` into the checkpoint's model spec and restarts the optimizer), `lr_factor`, `eligible`,
    `stats`, `state_dict` / `load_state_dict`, `remove`.
    """

    name = "low-rank"

    def __init__(self, model: nn.Module, spec: QuantSpec, *, epochs: int, ratio: float, rho: float = 1e-2,
                 admm_at: float = 0.3, swap_at: float = 0.7, multiple: int = 1,
                 keep_dense: Sequence[str] = (), sparsity: Any = None) -> None:
        if not 0 <= admm_at <= swap_at <= 1:
            raise UsageError(f"low rank needs 0 <= rank_admm_at <= rank_swap_at <= 1 (got {admm_at}, {swap_at})")
        if rho < 0:
            raise UsageError(f"--rank-rho must be >= 0, got {rho}")
        self.model, self.spec = model, spec
        self.ratio, self.rho, self.multiple, self.keep_dense = float(ratio), float(rho), int(multiple), list(keep_dense)
        self.admm_start, self.swap_epoch = phase_epochs(epochs, admm_at, swap_at)
        self.sparsity = sparsity  # channel sparsity: its mask is fixed by the time ranks are chosen
        self.structure: dict[str, Any] | None = None  # the allocation's model-spec form, once chosen
        self.allocation: dict[str, Any] | None = None  # its report (ranks, params)
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.updated: int = -1  # last epoch whose end-of-epoch update ran (resume must not repeat it)
        self.swapped = bool(_low_rank_modules(model))  # a checkpoint rebuilt after the swap
        self.swap_residual: float | None = None  # ||W - Proj(W)|| / ||W|| when the layers were swapped
        self._inputs: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        if not self.swapped and not candidate_layers(model, keep_dense):
            raise UsageError("--low-rank: the model has no layer to factorize (stem and classifier stay dense)")

    # -- schedule ----------------------------------------------------------------------------------------
    def lr_factor(self, epoch: int) -> float:
        return 1.0

    def eligible(self, epoch: int) -> bool:
        return epoch >= self.swap_epoch - 1  # the swap ran at the end of that epoch, before its checkpoint

    def _admm_layers(self) -> dict[str, nn.Module]:
        assert self.structure is not None
        return {n: self.model.get_submodule(n) for n, d in self.structure["layers"].items() if d["form"] != DENSE}

    def _ranks(self, name: str) -> tuple[int, int]:
        assert self.structure is not None
        r = self.structure["layers"][name]["ranks"]
        return int(r[0]), int(r[1])

    def _proj(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return project(w if w.dim() > 2 else w[:, :, None], self._ranks(name)).reshape(w.shape)

    # -- the loop's calls --------------------------------------------------------------------------------
    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.swapped or epoch < self.admm_start:
            return
        if self.structure is None:
            self.choose_ranks()
        if epoch == self.swap_epoch - 1 and not self._hooks:
            self._record_inputs()

    @torch.no_grad()
    def choose_ranks(self) -> None:
        """Global rank selection on the current weights; Z = Proj(W), U = 0. With channel sparsity the ranks
        are chosen for the channels that remain: pruned channels' rows and input columns are zero, and the
        budget counts each layer at its remaining shape (what export --prune-channels stores)."""
        if self.sparsity is not None:
            if not self.sparsity.finetuning:
                raise RuntimeError("low rank chooses ranks after the channel mask is fixed (config.finetune_epoch)")
            self.sparsity.zero_pruned_inputs(self.model)
        layers = candidate_layers(self.model, self.keep_dense)
        alloc = allocate({n: remaining(m.weight.detach()) for n, m in layers}, self.ratio, self.multiple)
        for n, m in layers:  # a matrix layer's second rank is its whole input (SVD), pruned columns included
            plan = alloc.plans[n]
            if alloc.geometry[n].matrix and plan.form != DENSE:
                alloc.plans[n] = LayerPlan(plan.form, (plan.ranks[0], int(m.weight.shape[1])))
        self.structure, self.allocation = alloc.structure(), alloc.report()
        for n, m in self._admm_layers().items():
            self.z[n] = self._proj(n, m.weight.detach())
            self.u[n] = torch.zeros_like(m.weight)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.swapped or not self.z or self.rho == 0:
            return None
        layers = self._admm_layers()
        return admm_penalty([layers[n].weight for n in self.z], self.z.values(), [self.u[n] for n in self.z],
                            self.rho)

    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        """ADMM's Z and U updates; the swap at the end of the last ADMM epoch (returns True then)."""
        if self.swapped or self.structure is None or epoch <= self.updated:
            return False
        self.updated = epoch
        if epoch >= self.swap_epoch - 1:
            self.swap()
            return True
        with torch.no_grad():
            for n, m in self._admm_layers().items():
                w = m.weight.detach()
                self.z[n] = self._proj(n, w + self.u[n])
                self.u[n] += w - self.z[n]
        return False

    # -- the swap ----------------------------------------------------------------------------------------
    def _record_inputs(self) -> None:
        """Keep the last training batch each chosen layer reads, to calibrate its replacement's quantizers."""
        def keep(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                if module.training:
                    x = args[0]
                    self._inputs[name] = getattr(x, "value", x)[:CALIB_IMAGES].detach().clone()
            return hook

        for n, m in self._admm_layers().items():
            self._hooks.append(m.register_forward_pre_hook(keep(n)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def swap(self) -> None:
        """Replace every chosen layer by its factorized module, initialized from Proj(W)."""
        self.remove()
        assert self.structure is not None
        self.swap_residual = self.residual()
        for n, layer in self._admm_layers().items():
            plan = LayerPlan.from_dict(self.structure["layers"][n], n)
            new = factorized_from(layer, plan, self.spec)
            init_weight_scales(new)
            x = self._inputs.get(n)
            if x is None:
                raise RuntimeError(f"low rank: no recorded input for {n}; cannot calibrate its quantizers")
            with calibration_mode(new):
                new(x)
            new.train(layer.training)
            set_module(self.model, n, new)
        self._inputs.clear()
        self.z.clear()
        self.u.clear()
        self.swapped = True

    def spec_kwargs(self) -> dict[str, Any]:
        """What the checkpoint's model spec needs to rebuild the factorized model."""
        return {"low_rank": self.structure} if self.swapped else {}

    # -- reporting and state -----------------------------------------------------------------------------
    @torch.no_grad()
    def residual(self) -> float | None:
        """||W - Proj(W)|| / ||W|| over all chosen layers (None before the ranks are chosen or after the swap)."""
        if self.swapped or self.structure is None:
            return None
        num = den = 0.0
        for n, m in self._admm_layers().items():
            w = m.weight.detach().to(torch.float64)
            num += float((w - self._proj(n, w)).square().sum())
            den += float(w.square().sum())
        return math.sqrt(num / den) if den else 0.0

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "phase": "factorized" if self.swapped else (
            "admm" if self.structure is not None else "dense"), "residual": self.residual(), "rho": self.rho,
            "admm_start": self.admm_start, "swap_epoch": self.swap_epoch, "residual_at_swap": self.swap_residual}
        if self.allocation is not None:
            a = self.allocation
            out.update({"ratio": a["ratio"], "params": a["params"], "dense_params": a["dense_params"],
                        "ranks": {n: d["ranks"] for n, d in a["layers"].items() if d["form"] != DENSE}})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "structure": self.structure, "allocation": self.allocation,
                "z": dict(self.z), "u": dict(self.u), "updated": self.updated, "swapped": self.swapped,
                "admm_start": self.admm_start, "swap_epoch": self.swap_epoch, "swap_residual": self.swap_residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise UsageError(f"plugin state is for {state.get('method')!r}, not {self.name!r}")
        self.structure, self.allocation = state.get("structure"), state.get("allocation")
        device = next(self.model.parameters()).device  # checkpoints load on the CPU
        self.z = {n: t.to(device) for n, t in (state.get("z") or {}).items()}
        self.u = {n: t.to(device) for n, t in (state.get("u") or {}).items()}
        self.updated = int(state.get("updated", -1))
        self.admm_start, self.swap_epoch = int(state["admm_start"]), int(state["swap_epoch"])
        self.swapped = bool(state.get("swapped")) or self.swapped
        self.swap_residual = state.get("swap_residual")
