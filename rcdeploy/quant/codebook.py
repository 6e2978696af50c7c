"""Codebook projection of a weight tensor onto the integer grid of its Brevitas quantizer (ATMC's Z-step).

`project_codebook(v, scale, bits, qmax, support)` returns Z, the nearest tensor (Lloyd's algorithm,
a local optimum of ||v - Z||^2) with

* Z zero outside `support` (the weights the global L0 budget keeps) and zero as a fixed center inside it;
* every nonzero Z[c, ...] = scale[c] * q with q an integer in [-qmax, qmax] (the quantizer's own grid, so
  Brevitas rounds Z to exactly q and the exported integer tensor holds exactly these q);
* at most 2**bits distinct nonzero integers q in the whole tensor.

Distances are measured in weight units: an entry of channel c weighs scale[c]**2, so the objective is
||v - Z||^2 itself. The center update of a cluster is the rounded weighted mean, the exact minimiser over
integers of a 1-D weighted quadratic, so neither Lloyd step increases the objective.

Symmetric codebooks (the default) are {0, +-m_1, ..., +-m_K} with K = 2**(bits - 1) magnitudes: Lloyd on
|v| gives them exactly (the nearest of +-m to v is sign(v) m with m nearest to |v|). Why symmetric: the
integer export folds BatchNorm by flipping the integer signs of channels with a negative gain, which maps
a symmetric codebook onto itself but can double an asymmetric one (2**bits centers -> up to 2**(bits+1)
distinct values in the file). `symmetric=False` gives ATMC's own form, 2**bits free centers plus zero.
Initial centers are quantiles of the kept values (deterministic), not ATMC's random entries.
"""

from __future__ import annotations

import torch

LLOYD_ITERS = 20  # ATMC's reference setting


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-channel tensor ([C], [C, 1], [C, 1, 1, 1]) broadcast to `like`'s shape."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1)).expand_as(like)


def lloyd_1d(t: torch.Tensor, w: torch.Tensor, k: int, *, integer: bool, lo: float, hi: float,
             iters: int = LLOYD_ITERS, init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means with a fixed center at 0 and up to `k` free centers in [lo, hi] (integers when
    `integer`). Returns (centers, per-entry value: the center each entry is assigned to, 0 included).
    `init`: starting centers (the previous codebook: a warm start keeps the codebook from jumping between
    ADMM updates), topped up with quantiles of `t` to `k`."""
    if t.numel() == 0 or k < 1:
        return t.new_zeros(0), torch.zeros_like(t)
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k, device=t.device, dtype=torch.float64)
    # torch.quantile takes at most 2**24 entries: an evenly strided sample of larger tensors
    sample = t.double().flatten()[:: max(1, -(-t.numel() // (1 << 24)))]
    centers = _clean(torch.quantile(sample, qs), integer, lo, hi)
    if init is not None and init.numel():
        warm = _clean(init.to(t.device, torch.float64).flatten(), integer, lo, hi)[:k]
        extra = centers[~torch.isin(centers, warm)][: k - len(warm)]
        centers = torch.unique(torch.cat([warm, extra]))
    t64, w64 = t.double(), w.double()
    assign = None
    for _ in range(iters):
        book = torch.cat([centers.new_zeros(1), centers]).sort().values
        new = _nearest(t64, book)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(book).index_add_(0, assign, w64 * t64)
        mass = torch.zeros_like(book).index_add_(0, assign, w64)
        moved = torch.where(mass > 0, sums / mass.clamp_min(1e-300), book)  # an empty cluster stays
        centers = _clean(moved[book != 0], integer, lo, hi)
    book = torch.cat([centers.new_zeros(1), centers]).sort().values
    return centers.to(t.dtype), book[_nearest(t64, book)].to(t.dtype)


def _nearest(t: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `book` for every entry of `t` (ties: the lower one)."""
    hi = torch.searchsorted(book, t).clamp(1, len(book) - 1) if len(book) > 1 else torch.zeros_like(t, dtype=torch.long)
    if len(book) == 1:
        return hi
    lo = hi - 1
    return torch.where((t - book[lo]).abs() <= (book[hi] - t).abs(), lo, hi)


def _clean(centers: torch.Tensor, integer: bool, lo: float, hi: float) -> torch.Tensor:
    """Round (integer grid), clamp to the range, drop zero and duplicates (they merge into one center)."""
    c = centers.round() if integer else centers
    c = c.clamp(lo, hi)
    return torch.unique(c[c != 0])


@torch.no_grad()
def project_codebook(v: torch.Tensor, scale: torch.Tensor | None, bits: int, qmax: int | None = None,
                     support: torch.Tensor | None = None, *, symmetric: bool = True,
                     iters: int = LLOYD_ITERS) -> torch.Tensor:
    """Z: `v` projected onto at most 2**bits nonzero codebook values, integer multiples of the per-output-
    channel `scale` within [-qmax, qmax] (`scale` None: a float codebook, any values), zero outside
    `support` (a bool mask like `v`; None: everywhere allowed). See the module docstring."""
    return fit_codebook(v, scale, bits, qmax, support, symmetric=symmetric, iters=iters)[0]


@torch.no_grad()
def fit_codebook(v: torch.Tensor, scale: torch.Tensor | None, bits: int, qmax: int | None = None,
                 support: torch.Tensor | None = None, *, symmetric: bool = True, iters: int = LLOYD_ITERS,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`project_codebook`, warm-started from the centers `init` (in grid units; magnitudes when symmetric);
    returns (Z, the centers) so the next call can start from them."""
    if bits < 1:
        raise ValueError(f"codebook bits must be >= 1, got {bits}")
    keep = torch.ones_like(v, dtype=torch.bool) if support is None else support.to(v.device).bool()
    if scale is None:
        t_all, w_all = v, torch.ones_like(v)
        bound = float("inf")
    else:
        s = _channel_view(scale.detach().to(v.device, v.dtype), v)
        t_all, w_all = v / s, s * s
        bound = float(qmax) if qmax is not None else float("inf")
    t, w = t_all[keep], w_all[keep]
    if symmetric:
        centers, mags = lloyd_1d(t.abs(), w, 2 ** (bits - 1), integer=scale is not None, lo=0.0, hi=bound,
                                 iters=iters, init=init)
        q = torch.sign(t) * mags
    else:
        centers, q = lloyd_1d(t, w, 2 ** bits, integer=scale is not None, lo=-bound, hi=bound, iters=iters,
                              init=init)
    out = torch.zeros_like(v)
    out[keep] = q if scale is None else q * _channel_view(scale.detach().to(v.device, v.dtype), v)[keep]
    return out, centers


def codebook_objective(v: torch.Tensor, z: torch.Tensor) -> float:
    """||v - z||^2 (what the Lloyd steps lower)."""
    return float(((v - z).double() ** 2).sum())
