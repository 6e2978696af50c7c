"""What the per-attack results say beyond each attack's own figure.

`gradient_masking_flags` warns when a black-box, smooth-surrogate or one-step attack beats the attacks
it should not; `first_broken_by` credits each image to the first attack that reached its worst score.
Pure functions of report rows and a `WorstCase`: no model is needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rcdeploy.robustness import WorstCase


def noise_pct(acc_pct: float, n: int) -> float:
    """Two binomial standard errors of an accuracy over n images, at least one image (in %)."""
    p = min(max(acc_pct / 100.0, 0.0), 1.0)
    return max(100.0 / n, 200.0 * math.sqrt(p * (1 - p) / n))


_ONE_STEP = ("fgsm",)
_ITERATIVE = ("ifgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t")


def _source(row: dict[str, Any]) -> str:
    """A report row's gradient source: "queries" (black box), "ste" or "smooth" (older rows: by family)."""
    return row.get("gradient_source") or ("queries" if row["family"] == "square" else "ste")


def gradient_masking_flags(robust: list[dict[str, Any]], samples: int) -> list[str]:
    """Warnings of likely gradient masking from per-attack results (`family`, `name`, `robust_acc_pct`,
    optionally `gradient_source`).

    - a black-box attack (square) or an attack on the smooth surrogate (`@smooth`) beats every
      straight-through white-box attack by more than noise: the straight-through gradients are masked;
    - a one-step attack (fgsm) beats an iterative one by more than noise.
    Noise is two binomial standard errors (at least one image) of the better straight-through figure.
    """
    flags: list[str] = []
    white = [r for r in robust if _source(r) == "ste" and r["family"] in _ONE_STEP + _ITERATIVE]
    others = [r for r in robust if _source(r) in ("queries", "smooth")]
    if white:
        best_white = min(white, key=lambda r: r["robust_acc_pct"])
        tol = noise_pct(best_white["robust_acc_pct"], samples)
        for r in others:
            gap = best_white["robust_acc_pct"] - r["robust_acc_pct"]
            if gap > tol:
                kind = "black-box" if _source(r) == "queries" else "smooth-surrogate"
                flags.append(f"likely gradient masking: {kind} {r['name']} ({r['robust_acc_pct']:.1f}%) beats the "
                             f"best straight-through attack {best_white['name']} ({best_white['robust_acc_pct']:.1f}%)"
                             f" by {gap:.1f} points (noise {tol:.1f})")
    for one in (r for r in robust if r["family"] in _ONE_STEP):
        for it in (r for r in robust if r["family"] in _ITERATIVE and _source(r) == _source(one)):
            gap = it["robust_acc_pct"] - one["robust_acc_pct"]
            tol = noise_pct(it["robust_acc_pct"], samples)
            if gap > tol:
                flags.append(f"likely gradient masking: one-step {one['name']} ({one['robust_acc_pct']:.1f}%) beats "
                             f"iterative {it['name']} ({it['robust_acc_pct']:.1f}%) by {gap:.1f} points "
                             f"(noise {tol:.1f})")
    return flags


def first_broken_by(worst: WorstCase) -> dict[str, Any]:
    """Per image, the first of clean and the attacks (in run order) that reached its worst score.

    `first`: images credited to each name ("clean": already wrong without an attack; "robust": no attack
    lowered the score); `only`: images no other attack brought as low (what dropping that attack would
    lose). With noise draws a score is a fraction and "reached" means equal to the image's minimum.
    """
    scores = np.stack(worst.scores)  # [1 + attacks, N]
    low = scores.min(0)
    first_idx = (scores == low[None]).argmax(0)
    hurt = low < 1.0
    names = worst.names
    first = {name: int(((first_idx == i) & hurt).sum()) for i, name in enumerate(names)}
    first["robust"] = int((~hurt).sum())
    reached = scores[1:] == low[None]
    unique = reached.sum(0) == 1
    only = {name: int((reached[i] & unique & hurt & (scores[0] > low)).sum()) for i, name in enumerate(names[1:])}
    return {"order": names, "first": first, "only": only, "images": int(scores.shape[1])}
