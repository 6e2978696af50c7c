"""The attack base class: eps ball, [0, 1] clamping, model mode, EOT, restarts, randomness.

Each attack only writes its step loop (`perturb`); everything shared lives here, so the
invariants (stays in the ball, leaves the model as it found it) are enforced in one place.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcdeploy.errors import UsageError
from rcdeploy.registry import Registry

#: A model as attacks see it: float images [N, C, H, W] in [0, 1] -> logits [N, K].
Model = Callable[[Tensor], Tensor]

#: Default step of the iterative attacks, as a fraction of eps: eps/4 is 2/255 at eps 8/255,
#: the literature's IFGSM/PGD setting. Stated here only; constructors and the parser defer to it.
DEFAULT_STEP_FRACTION = 0.25

ATTACKS: Registry[type[Attack]] = Registry("attack")


@contextmanager
def attack_mode(model: Model) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack; restored exactly after.

    Each submodule's own `training` flag and each parameter's `requires_grad` are put back one
    by one, so a deliberately frozen BatchNorm or parameter stays as the caller left it.
    Eval keeps BatchNorm running statistics (and dropout) out of the attack; frozen parameters
    mean the forward builds no graph towards them and no `.grad` can ever be written to them.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    params = list(model.parameters())
    modes = [m.training for m in modules]
    flags = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample CW margin max_{j != y} z_j - z_y: positive means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    return other - true


class Attack:
    """Base of all L-inf attacks: settings in the constructor, `attack(model, x, y)` per call.

    Subclasses set `family` (the registry name) and implement `perturb` (one run from one start)
    and `loss` (per-sample, to be maximised). Everything works in [0, 1] image units.

    eot: gradients (or, for Square, logits) are averaged over this many forward passes, for
        models that are stochastic at test time (expectation over transformation).
    restarts: independent runs; per sample the worst case is kept (a misclassified result
        wins, otherwise the highest loss).
    seed: with a seed, random starts come from a private generator (one per device) that
        advances across calls, so a whole run is reproducible; without, from torch's global RNG.
    """

    family: str = "attack"
    #: Whether `name` carries the step count (ifgsm20) or not (fgsm).
    counted: bool = True
    #: Whether the constructor takes a `step` (ifgsm, pgd, cw) or sets its own (square, apgd).
    uses_step: bool = True
    #: Whether the attack queries outputs only (square): then it has no gradient source to choose.
    black_box: bool = False

    def __init__(
        self,
        eps: float,
        step: float | None = None,
        steps: int = 10,
        *,
        restarts: int = 1,
        eot: int = 1,
        seed: int | None = None,
    ) -> None:
        if not (isinstance(eps, numbers.Real) and 0 < eps <= 1):
            raise UsageError(f"attack eps {eps!r} is outside (0, 1]; give it in [0, 1] image units, e.g. 8/255")
        step = eps * DEFAULT_STEP_FRACTION if step is None else step
        if not (isinstance(step, numbers.Real) and 0 < step < math.inf):
            raise UsageError(f"attack step {step!r} must be a positive number (image units, e.g. 2/255)")
        for what, value in (("steps", steps), ("restarts", restarts), ("eot", eot)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise UsageError(f"attack {what} {value!r} must be an integer >= 1")
        self.eps = float(eps)
        self.step = float(step)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.eot = int(eot)
        self.seed = seed
        # Which model the caller hands the attack (GRADIENT_SOURCES): "ste", the straight-through twin
        # of the graph, or "smooth", its rounding-free surrogate. The attack itself is the same; the
        # name carries the choice (`apgd-ce100@smooth`) so reports and presets can tell them apart.
        self.gradients = "ste"
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- what a subclass writes ---------------------------------------------------------------
    def perturb(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """One run from one start; returns x_adv inside the ball and [0, 1]."""
        raise NotImplementedError

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample loss the attack maximises (cross-entropy unless overridden)."""
        return F.cross_entropy(logits, y, reduction="none")

    # -- the public call -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The spec this attack parses from, e.g. `pgd10` or `apgd-ce100@smooth` (reports, round trips)."""
        base = f"{self.family}{self.steps}" if self.counted else self.family
        return base if self.gradients == "ste" else f"{base}@{self.gradients}"

    def to_dict(self) -> dict[str, Any]:
        """Settings, for reports."""
        return {
            "name": self.name,
            "family": self.family,
            "eps": self.eps,
            "step": self.step,
            "steps": self.steps,
            "restarts": self.restarts,
            "eot": self.eot,
            "seed": self.seed,
            "gradients": "none (output queries)" if self.black_box else self.gradients,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k not in ("name", "family", "gradients"))
        return f"{type(self).__name__}({args})"

    def attack(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial images for `model` at (x, y): same shape, dtype and device as x."""
        if x.ndim != 4 or not x.is_floating_point():
            raise UsageError(f"attack input must be float images [N, C, H, W], got {tuple(x.shape)} {x.dtype}")
        # An inference-mode tensor cannot enter autograd; a copy outside it can.
        x = x.clone() if x.is_inference() else x.detach()
        y = y.to(x.device, torch.long)
        with attack_mode(model):
            best = self.perturb(model, x, y)
            if self.restarts > 1:
                best_wrong, best_loss = self._score(model, best, y)
                for _ in range(self.restarts - 1):
                    cand = self.perturb(model, x, y)
                    wrong, loss = self._score(model, cand, y)
                    better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
                    best = torch.where(better[:, None, None, None], cand, best)
                    best_wrong = torch.where(better, wrong, best_wrong)
                    best_loss = torch.where(better, loss, best_loss)
        return best.detach()

    def __call__(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        # Dispatch through `attack` so a subclass override (Square resets its query count) is the one called.
        return self.attack(model, x, y)

    # -- helpers for subclasses ----------------------------------------------------------------
    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel [lo, hi] of the eps ball intersected with [0, 1], for one-op projection."""
        return (x - self.eps).clamp_(min=0), (x + self.eps).clamp_(max=1)

    def reseed(self, seed: int | None) -> Attack:
        """Restart the random starts from `seed` (a chunk's own seed: see robustness.chunk_seed); returns self."""
        self.seed = seed
        self._generators = {}
        return self

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator for `device`, or None (torch's global RNG) without a seed."""
        if self.seed is None:
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def random_start(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Uniform start in the eps ball (Madry et al.), clamped to [0, 1]."""
        noise = torch.empty_like(x).uniform_(-self.eps, self.eps, generator=self.generator(x.device))
        return torch.clamp(x + noise, lo, hi)

    def input_grad(self, model: Model, x_adv: Tensor, y: Tensor) -> Tensor:
        """d loss / d input, averaged over `eot` passes; gradients reach the input only."""
        xr = x_adv.detach().requires_grad_(True)
        grad = None
        with torch.enable_grad():
            for _ in range(self.eot):
                (g,) = torch.autograd.grad(self.loss(model(xr), y).sum(), xr)
                grad = g if grad is None else grad + g
        return grad / self.eot if self.eot > 1 else grad

    def signed_ascent(self, model: Model, x_adv: Tensor, y: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """`steps` L-inf steepest-ascent steps of size `step`, projected each time (IFGSM/PGD/CW)."""
        for _ in range(self.steps):
            x_adv = torch.clamp(x_adv + self.step * self.input_grad(model, x_adv, y).sign(), lo, hi)
        return x_adv

    def logits(self, model: Model, x: Tensor) -> Tensor:
        """Logits without a graph, averaged over `eot` passes, on x's device (model may be ORT)."""
        with torch.no_grad():
            out = sum(torch.as_tensor(model(x)).to(x.device, torch.float32) for _ in range(self.eot))
        return out / self.eot

    def _score(self, model: Model, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(model, x_adv)
        return logits.argmax(1) != y, self.loss(logits, y)
