"""The ADMM penalty every ADMM-trained method adds to its loss (pruning, ATMC's codebook, CSTAR's low rank)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def admm_penalty(ws: Iterable[torch.Tensor], zs: Iterable[torch.Tensor], us: Iterable[torch.Tensor],
                 rho: float) -> torch.Tensor:
    """rho/2 sum ||W - Z + U||^2: the scaled-dual augmented Lagrangian's coupling term, with each Z and U
    (kept wherever the method keeps them) moved to its W's device; gradients reach W only."""
    return (rho / 2) * sum(((w - z.to(w.device) + u.to(w.device)) ** 2).sum() for w, z, u in zip(ws, zs, us))
