"""Per-layer weight bits under a byte budget: a multiple-choice knapsack (`train --bits auto --size-budget`).

Each layer l picks one option b from CANDIDATE_BITS; choosing b costs `layer_bytes` and leaves the
amplified error D_l(b) = A_l * e_l(b) (`rcdeploy.quant.lipschitz`). Minimize sum_l D_l(b_l) subject to
sum_l bytes_l(b_l) <= budget.

Bytes (our definition, the same everywhere the budget is shown): per weight layer,
ceil(weights * bits / 8) (the weights bit-packed at their nominal width) + 8 bytes per output channel
(a float32 scale and an int32 bias, which every exported layer carries once BatchNorm is folded).
Activation quantizer parameters and the ONNX framing are not counted. The deployed ONNX file stores
weights of 4 bits and fewer as packed INT4 and wider ones as int8, so its weight bytes are at least
these (the model card records both).

Solver (monotone greedy on the convex hulls, the classic MCKP greedy that ATMC's `mckp_greedy` also
uses): every layer starts at its fewest bits; each layer's options are reduced to the lower convex hull
of (bytes, D); all hull steps of all layers are put in one order, by error removed per byte, best first
(convexity keeps each layer's own steps in order), followed by each layer's remaining single-bits
raises up to its top option; the allocation takes the longest prefix of that order that fits. If the
first step that does not fit jumps several options at once (a hull step), its layer is then raised as
far toward it as the leftover allows.

Two properties follow, and the tests check them:
* monotone: a larger budget takes a longer prefix of the same order, so no layer ever gets fewer bits;
* within one step: budget - bytes < the bytes of raising the *blocking* layer (the one whose next step
  did not fit) by one option. Hence also budget - bytes < the largest one-option raise of any layer not
  at its top option. (The stronger "no layer at all could still be raised" cannot hold together with
  monotonicity for any allocator that orders by error: at a leftover that fits only a cheap raise, the
  cheap raise would be forced, and monotonicity would then keep it at every larger budget, so raises
  would be ordered by cost, not by error.)
An exact DP would minimize the error further but is not monotone in the budget; `dp_error` reports the
DP optimum on a byte grid so the greedy's gap is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rcdeploy.errors import UsageError
from rcdeploy.units import format_size

CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)  # 2 = ternary; 7 left out: 8 costs one bit more and is the int8 top
OVERHEAD_PER_CHANNEL = 8             # bytes: float32 scale + int32 bias per output channel


def layer_bytes(weights: int, out_channels: int, bits: int) -> int:
    """Bytes of one layer at `bits` under the budget's definition (module docstring)."""
    return math.ceil(weights * bits / 8) + OVERHEAD_PER_CHANNEL * out_channels


@dataclass(frozen=True)
class LayerOptions:
    """One layer's choices: bits -> (bytes, amplified error D). `pinned`: a single option (a user override)."""

    name: str
    weights: int
    out_channels: int
    errors: dict[int, float]  # bits -> D_l(b)

    @property
    def bits(self) -> list[int]:
        return sorted(self.errors)

    def bytes(self, bits: int) -> int:
        return layer_bytes(self.weights, self.out_channels, bits)


@dataclass
class Allocation:
    bits: dict[str, int]
    bytes: int
    budget: int
    error: float                   # sum_l D_l(b_l)
    min_bytes: int                 # every layer at its fewest bits
    max_bytes: int                 # every layer at its most bits
    blocking: dict[str, Any] | None = None  # the next raise that did not fit: layer, to_bits, bytes
    dp_error: float | None = None  # the exact-DP optimum on a byte grid (a lower bound up to the grid)
    order: list[dict[str, Any]] = field(default_factory=list)  # the raises taken, in order

    def to_dict(self) -> dict[str, Any]:
        return {"bits": dict(self.bits), "bytes": self.bytes, "budget": self.budget, "error": self.error,
                "min_bytes": self.min_bytes, "max_bytes": self.max_bytes, "blocking": self.blocking,
                "dp_error": self.dp_error, "raises": len(self.order)}


def _hull(opt: LayerOptions) -> list[int]:
    """Indices (into opt.bits) of the lower convex hull of (bytes, D) from the cheapest option, D decreasing."""
    bits = opt.bits
    pts = [(opt.bytes(b), opt.errors[b]) for b in bits]
    hull = [0]
    for i in range(1, len(pts)):
        if pts[i][1] >= pts[hull[-1]][1]:
            continue  # more bytes, no less error: never on the hull
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = pts[hull[-2]], pts[hull[-1]]
            x2, y2 = pts[i]
            # drop the middle point when it lies on or above the segment from hull[-2] to i
            if (y1 - y0) * (x2 - x0) >= (y2 - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _order(layers: Sequence[LayerOptions]) -> list[tuple[int, int, int]]:
    """The fixed raise order: (layer index, from option index, to option index)."""
    steps = []
    tails = []
    for li, opt in enumerate(layers):
        hull = _hull(opt)
        bits = opt.bits
        for a, b in zip(hull, hull[1:]):
            gain = opt.errors[bits[a]] - opt.errors[bits[b]]
            cost = opt.bytes(bits[b]) - opt.bytes(bits[a])
            steps.append((-gain / max(cost, 1e-12), li, a, b))
        tails.extend((li, i, i + 1) for i in range(hull[-1], len(bits) - 1))
    steps.sort()
    return [(li, a, b) for _, li, a, b in steps] + tails


def allocate(layers: Sequence[LayerOptions], budget: int, *, dp: bool = True) -> Allocation:
    """Bits per layer minimizing the summed amplified error within `budget` bytes (see the module docstring)."""
    if not layers:
        raise UsageError("--bits auto: the model has no weight layers to allocate bits to")
    lo = sum(opt.bytes(opt.bits[0]) for opt in layers)
    hi = sum(opt.bytes(opt.bits[-1]) for opt in layers)
    if budget < lo:
        raise UsageError(f"--size-budget {format_size(budget)} is below the smallest this model can be "
                         f"({format_size(lo)}: every layer at its fewest bits, {layers[0].bits[0]})")
    current = [0] * len(layers)
    used = lo
    taken: list[dict[str, Any]] = []
    blocking = None
    for li, a, b in _order(layers):
        opt = layers[li]
        bits = opt.bits
        if current[li] != a:
            continue  # cannot happen with a consistent order; kept as a guard
        # the whole hull step if it fits, else (a multi-option step) as many single options as fit
        for m in range(b, a, -1):
            extra = opt.bytes(bits[m]) - opt.bytes(bits[a])
            if used + extra <= budget:
                current[li] = m
                used += extra
                taken.append({"layer": opt.name, "bits": bits[m], "bytes": extra})
                break
        if current[li] == b:
            continue
        nxt = current[li] + 1
        blocking = {"layer": opt.name, "to_bits": bits[nxt],
                    "bytes": opt.bytes(bits[nxt]) - opt.bytes(bits[current[li]])}
        break
    chosen = {opt.name: opt.bits[current[i]] for i, opt in enumerate(layers)}
    error = sum(opt.errors[chosen[opt.name]] for opt in layers)
    return Allocation(bits=chosen, bytes=used, budget=budget, error=error, min_bytes=lo, max_bytes=hi,
                      blocking=blocking, dp_error=dp_optimum(layers, budget) if dp else None, order=taken)


def dp_optimum(layers: Sequence[LayerOptions], budget: int, grid_cells: int = 4096) -> float:
    """The least summed error of any allocation within `budget`, by DP over a byte grid (costs rounded up
    to the grid, so it is feasible; with a grid of 1 byte it is exact)."""
    lo = sum(opt.bytes(opt.bits[0]) for opt in layers)
    step = max(1, math.ceil((budget - lo + 1) / grid_cells))
    cells = (budget - lo) // step
    inf = float("inf")
    best = [0.0] + [inf] * cells  # best[c]: least error using c grid steps above the minimum
    for opt in layers:
        base = opt.bytes(opt.bits[0])
        options = [(math.ceil((opt.bytes(b) - base) / step), opt.errors[b]) for b in opt.bits]
        new = [inf] * (cells + 1)
        for c in range(cells + 1):
            if best[c] == inf:
                continue
            for dc, e in options:
                if c + dc <= cells and best[c] + e < new[c + dc]:
                    new[c + dc] = best[c] + e
        best = new
    return min(best)
