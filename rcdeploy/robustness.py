"""Robust accuracy as a worst case over attacks: one evaluator for bench and for training validation.

An attack crafts adversarial images batch by batch against one model (`craft`); a scorer turns images
into per-sample scores (1 correct, 0 wrong, a fraction for the mean over noise draws); the worst case
keeps, per sample, the lowest score over clean and every attack (AutoAttack's robust accuracy). Who
scores is the caller's choice: bench scores on the deployed runtime, training on the PyTorch model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Model = Callable[[torch.Tensor], torch.Tensor]
EPS_SLACK = 1e-6  # float32 rounding allowed when checking that images stay in the eps ball


@dataclass
class Crafted:
    """One attack's adversarial images and what checking them found."""

    x_adv: torch.Tensor
    time_s: float
    max_perturbation: float
    within_eps: bool
    in_unit_range: bool
    queries: torch.Tensor | None = None  # per image, for query-counting attacks (Square)


@dataclass
class WorstCase:
    """Per-sample scores, clean first, then one per attack; `worst` is their per-sample minimum."""

    names: list[str] = field(default_factory=lambda: ["clean"])
    scores: list[np.ndarray] = field(default_factory=list)

    def add(self, name: str, score: np.ndarray) -> None:
        if self.scores:
            self.names.append(name)
        self.scores.append(np.asarray(score, dtype=float))

    @property
    def worst(self) -> np.ndarray:
        return np.min(np.stack(self.scores), axis=0)


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of one chunk of images: a function of (seed, chunk index) only, so any split of the chunks
    over ranks, or a rerun of one chunk, crafts the same images and draws the same model noise."""
    return (seed * 1_000_003 + chunk * 10_007 + 12_345) % (2**31 - 1)


def chunks(n: int, size: int) -> list[slice]:
    """[0, n) in consecutive slices of `size` (the last may be shorter)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def owned(items: list[Any], rank: int, size: int) -> list[tuple[int, Any]]:
    """(index, item) of the items rank `rank` of `size` works on: every size-th, starting at its rank."""
    return [(i, it) for i, it in enumerate(items) if i % size == rank]


def attack_batches(attack: Any, model: Model, x: torch.Tensor, y: torch.Tensor,
                   batch: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(the batch's slice of x, its adversarial images), one batch at a time, each yielded before the next
    is crafted: a caller that scores each batch as it comes (training validation) draws a stochastic
    model's noise in the same order as attacking and scoring batch after batch."""
    for i in range(0, len(x), batch):
        part = slice(i, i + batch)
        yield part, attack.attack(model, x[part], y[part])


def craft(attack: Any, model: Model, x: torch.Tensor, y: torch.Tensor, batch: int,
          on_batch: Callable[[int], None] | None = None) -> Crafted:
    """Run `attack.attack(model, xb, yb)` over `x` in batches and check the result (eps ball, [0, 1])."""
    t = time.perf_counter()
    advs, queries = [], []
    for _, x_adv in attack_batches(attack, model, x, y, batch):
        advs.append(x_adv)
        if getattr(attack, "queries_used", None) is not None:
            queries.append(attack.queries_used.float())
        if on_batch is not None:
            on_batch(len(x_adv))
    x_adv = torch.cat(advs)
    elapsed = time.perf_counter() - t
    delta = (x_adv - x).abs().amax().item()
    return Crafted(x_adv=x_adv, time_s=elapsed, max_perturbation=delta, within_eps=delta <= attack.eps + EPS_SLACK,
                   in_unit_range=bool(x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0),
                   queries=torch.cat(queries) if queries else None)
