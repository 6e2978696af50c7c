"""Structured channel sparsity during training: group lasso, RGSM and network slimming behind one interface.

Every method works on the coupled channel groups of `rcdeploy.models.channels` (a channel is removable
only when it is zero on every producer and BN of its group, so methods shrink and zero whole groups),
at any bit width: the float weights under the quantizers are what gets zeroed, and a zero row quantizes
to zero. A channel's *function vector* is what sets its value: gamma and beta of every BN of the group
and the rows of producers without a BN of their own. Rows of a conv followed by its own BN are left out
of norms and shrinkage (the BN normalizes their scale away, and shrinking them under a fixed learned
quantizer scale would only round them to zero); they are zeroed together with their channel.

How the trainer drives a method (`rcdeploy/train/loop.py`):

    sp = create_sparsity(name, model, target=0.5, epochs=epochs)   # after calibration
    loss = loss + (sp.penalty(model) or 0)                         # each step
    optimizer.step(); sp.after_step(model, lr)                     # proximal steps / keep masks at zero
    sp.end_epoch(model, epoch, epochs)                             # schedules
    at the start of epoch sp.finetune_epoch(epochs): sp.start_finetune(model)   # fix the mask, fine-tune
    log sp.stats(model); checkpoint sp.state_dict()

`start_finetune` fixes the mask: it prunes the channels with the smallest scores (ranked across all
groups) to hit the target share exactly (as closely as `channel_multiple` allows), zeroes them, and
`after_step` keeps them at zero from then on.

Scores are comparable across groups only once each layer's scale is taken out (`normalize`, default
"layer"): a channel's score is sqrt(mean over the layers of its function vector of q / mean(q)), q its
squared row norm in that layer and mean(q) the layer's mean over its non-zero channels, so every group's
channels score about 1 on average and the global ranking compares how unequal the channels within each
layer are. Without it ("none", the behaviour before: the RMS of the raw function vector) a
residual-stream group of a PreAct-style model (PreAct ResNet, EnResNet), whose producers have no BN of
their own, is scored by its conv rows (RMS about 1/sqrt(fan-in), 0.07-0.15 at width 0.5) while every
inner group is scored by BN gammas (about 1): the global ranking cut the residual streams to `min_keep`
and the model collapsed to chance at the mask fix. Normalizing by the layer's mean, not by a per-group
quota, keeps the ranking global: a layer whose channels matter unequally still gives up more of them.

A new method subclasses `Sparsity`, overrides the hooks it needs (`score_layers`: what it ranks
channels by), registers itself in `SPARSITY` and is declared, with its kind, in `rcdeploy.names` (which
the CLI and recipe checks read without importing this module).
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.models.channels import ChannelGroup, trace_channels, unwrap
from rcdeploy.names import SPARSITY
from rcdeploy.registry import drop_none

FINETUNE_AT = 0.7  # share of the epochs spent in the sparse phase before the mask is fixed
MIN_KEEP = 0.1  # share of each group's channels that the mask never removes (at least one)
NORMALIZE = ("layer", "none")  # score scales: per-layer relative (default) | raw function-vector RMS (before)
STEPS_PER_EPOCH_GUESS = 100  # for per-step schedules in the first epoch, before a full epoch was counted


def register_sparsity(name: str):
    return SPARSITY.register(name)


def _rows(t: torch.Tensor) -> tuple[int, ...]:
    """View shape that broadcasts a per-channel [C] factor over a parameter of shape [C, ...]."""
    return (-1,) + (1,) * (t.dim() - 1)


def _sq_norms(params: list[torch.Tensor], size: int) -> torch.Tensor:
    """Per-channel squared L2 norms over parameters indexed by channel on dim 0 (on their device)."""
    sq = None
    for t in params:
        s = t.detach().reshape(size, -1).float().pow(2).sum(1)
        sq = s if sq is None else sq + s
    return sq


class Sparsity:
    """Base: mask fixing, stats, checkpoint state. Hooks do nothing unless a method overrides them."""

    name = "base"

    def __init__(self, model: nn.Module, *, target: float, channel_multiple: int = 1, epochs: int | None = None,
                 steps_per_epoch: int | None = None, finetune_at: float = FINETUNE_AT,
                 min_keep: float = MIN_KEEP, normalize: str = "layer") -> None:
        if not 0.0 <= target < 1.0:
            raise UsageError(f"channel pruning ratio must be in [0, 1), got {target}")
        if int(channel_multiple) < 1:
            raise UsageError(f"channel multiple must be >= 1, got {channel_multiple}")
        if not 0.0 < finetune_at <= 1.0:
            raise UsageError(f"fine-tune start must be a share of the epochs in (0, 1], got {finetune_at}")
        if not 0.0 <= min_keep < 1.0:
            raise UsageError(f"min_keep must be in [0, 1), got {min_keep}")
        if normalize not in NORMALIZE:
            raise UsageError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
        self.groups: list[ChannelGroup] = trace_channels(unwrap(model)).prunable()
        if not self.groups:
            raise UsageError("the model has no prunable channels (every channel feeds the input or output)")
        self.target = float(target)
        self.channel_multiple = int(channel_multiple)
        self.epochs = epochs
        self.finetune_at = float(finetune_at)
        self.min_keep = float(min_keep)
        self.normalize = normalize
        self.masks: list[torch.Tensor] | None = None  # per group, True = pruned; set by start_finetune
        self.epoch = 0
        self.steps_this_epoch = 0
        self.steps_per_epoch = int(steps_per_epoch or 0)

    # -- the interface the trainer calls --------------------------------------------------------
    @property
    def finetuning(self) -> bool:
        return self.masks is not None

    def finetune_epoch(self, epochs: int) -> int:
        """Epoch index at which the trainer calls `start_finetune`."""
        return int(epochs * self.finetune_at)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """Differentiable term added to the loss (None: nothing to add)."""
        return None

    def after_step(self, model: nn.Module, lr: float) -> None:
        """After each optimizer step: the method's proximal step, or keeping the fixed mask at zero."""
        self.steps_this_epoch += 1
        model = unwrap(model)
        if self.finetuning:
            self.apply_masks(model)
        else:
            self.sparse_step(model, lr)

    def end_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self.epoch = epoch + 1
        self.epochs = epochs
        if self.steps_this_epoch:
            self.steps_per_epoch = self.steps_this_epoch
        self.steps_this_epoch = 0

    def start_finetune(self, model: nn.Module) -> None:
        """Fix the mask: prune the lowest-scoring channels to hit the target share, and zero them."""
        model = unwrap(model)
        self.masks = self.fix_masks(self.scores(model))
        self.apply_masks(model)

    @torch.no_grad()
    def zero_pruned_inputs(self, model: nn.Module) -> None:
        """Zero the input columns that read pruned channels (the fixed mask): low rank calls this before it
        chooses ranks, so that a layer's rank budget is spent on the channels that remain."""
        model = unwrap(model)
        for g, mask in zip(self.groups, self.masks or []):
            if mask.any():
                g.zero_inputs_(model, mask)

    def retrace(self, model: nn.Module) -> None:
        """The model's layers were replaced (low rank's swap): trace its groups again and fix, as the mask,
        exactly the channels that are zero now (the pruned ones stay pruned; new groups, such as the rank
        channels of factorized layers, keep every non-zero channel)."""
        model = unwrap(model)
        self.groups = trace_channels(model).prunable()
        self.masks = [~g.alive(model) for g in self.groups]

    def stats(self, model: nn.Module) -> dict[str, Any]:
        """Share of prunable channels that are removable now, in total and per group (by first producer)."""
        model = unwrap(model)
        layers: dict[str, float] = {}
        dead = total = 0
        for g in self.groups:
            d = int((~g.alive(model)).sum())
            layers[g.label] = round(d / g.size, 4)
            dead += d
            total += g.size
        return {"method": self.name, "phase": "finetune" if self.finetuning else "sparse", "target": self.target,
                "channel_sparsity": dead / total, "channels_removable": dead, "channels_prunable": total,
                **self.extra_stats(), "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings): checkpoints load with weights_only=True."""
        return {"method": self.name, "target": self.target, "channel_multiple": self.channel_multiple,
                "epochs": self.epochs, "finetune_at": self.finetune_at, "min_keep": self.min_keep,
                "normalize": self.normalize, "epoch": self.epoch, "steps_this_epoch": self.steps_this_epoch,
                "steps_per_epoch": self.steps_per_epoch, "group_sizes": [g.size for g in self.groups],
                "masks": None if self.masks is None else [m.clone() for m in self.masks],
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise UsageError(f"sparsity state is for {state.get('method')!r}, not {self.name!r}")
        if list(state["group_sizes"]) != [g.size for g in self.groups]:
            raise UsageError("sparsity state does not fit this model's channel groups (another architecture?)")
        self.target = float(state["target"])
        self.channel_multiple = int(state["channel_multiple"])
        self.epochs = state["epochs"]
        self.finetune_at = float(state["finetune_at"])
        self.min_keep = float(state["min_keep"])
        self.normalize = str(state.get("normalize", "none"))  # checkpoints from before the option: raw scores
        self.epoch = int(state["epoch"])
        self.steps_this_epoch = int(state["steps_this_epoch"])
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.masks = None if state["masks"] is None else [m.cpu().bool() for m in state["masks"]]
        self.load_extra_state(state["extra"])

    # -- what methods override -------------------------------------------------------------------
    def sparse_step(self, model: nn.Module, lr: float) -> None:
        """Per-step work in the sparse phase (model unwrapped)."""

    def scores(self, model: nn.Module) -> list[torch.Tensor]:
        """Per group, a CPU float score per channel, comparable across groups; the lowest are pruned.
        Default: the function vector's size, scaled per layer (`channel_scores`)."""
        return [s.cpu() for s in self.channel_scores(model)]

    def extra_stats(self) -> dict[str, Any]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------------------
    @torch.no_grad()
    def channel_scores(self, model: nn.Module) -> list[torch.Tensor]:
        """Per group, a score per channel (on the parameters' device) that scales linearly with the channel's
        function vector. "layer": sqrt(mean over the group's layers of q_c / mean q), q_c the channel's
        squared row norm in that layer, the mean over the layer's non-zero channels (see the module
        docstring); "none": the RMS of the raw function vector (norm / sqrt(its length))."""
        out = []
        for g in self.groups:
            layers = self.score_layers(g, model)
            if not layers:  # nothing to score by: never pruned
                out.append(torch.full((g.size,), float("inf")))
            elif self.normalize == "none":
                n = max(1, sum(t[0].numel() for layer in layers for t in layer))
                out.append(_sq_norms([t for layer in layers for t in layer], g.size).sqrt() / math.sqrt(n))
            else:
                total = None
                for layer in layers:
                    q = _sq_norms(layer, g.size)
                    rel = q * ((q > 0).sum().clamp_min(1) / q.sum().clamp_min(1e-30))  # q / mean of non-zero q
                    total = rel if total is None else total + rel
                out.append((total / len(layers)).sqrt())
        return out

    def score_layers(self, g: ChannelGroup, model: nn.Module) -> list[list[torch.Tensor]]:
        """The parameters a group's channels are scored by, per layer (rows indexed by channel)."""
        return g.function_layers(model)

    def apply_masks(self, model: nn.Module) -> None:
        for g, mask in zip(self.groups, self.masks or []):
            if mask.any():
                g.zero_(model, mask)

    def sparse_epochs(self) -> int:
        """Epochs in the sparse phase (the whole run when the epoch count is not known yet)."""
        return max(1, self.finetune_epoch(self.epochs)) if self.epochs else 1

    def fix_masks(self, scores: list[torch.Tensor], warn: bool = True) -> list[torch.Tensor]:
        """Greedy over channels in ascending score: prune until the share of removed channels reaches the
        target, counting each group's kept channels rounded up to `channel_multiple`; never below
        `min_keep` of a group (at least one channel)."""
        sizes = [g.size for g in self.groups]
        total = sum(sizes)
        need = round(self.target * total)
        m = self.channel_multiple

        def removed(gi: int, kept: int) -> int:
            return sizes[gi] - min(sizes[gi], math.ceil(kept / m) * m)

        floor = [min(s, max(1, math.ceil(self.min_keep * s))) for s in sizes]
        kept = list(sizes)
        flat = torch.cat([s.float().cpu() for s in scores])
        owner = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
        pruned = 0
        for idx in torch.argsort(flat, stable=True).tolist():
            if pruned >= need or not math.isfinite(flat[idx]):  # an infinite score: never pruned
                break
            gi = int(owner[idx])
            if kept[gi] - 1 < floor[gi]:
                continue
            before = removed(gi, kept[gi])
            kept[gi] -= 1
            pruned += removed(gi, kept[gi]) - before
        if pruned < need and warn:
            warnings.warn(f"channel pruning reaches {pruned / total:.3f}, not the target {self.target:.3f}: "
                          f"each group keeps at least {self.min_keep:.0%} of its channels", stacklevel=2)
        masks = []
        for gi, s in enumerate(scores):
            keep_n = min(sizes[gi], math.ceil(kept[gi] / m) * m)
            mask = torch.ones(sizes[gi], dtype=torch.bool)
            mask[torch.topk(s.float().cpu(), keep_n, sorted=False).indices] = False
            masks.append(mask)
        return masks


@register_sparsity("group-lasso")
class GroupLasso(Sparsity):
    """Proximal group lasso on each channel's function vector v_c: after every optimizer step
    v_c <- v_c * max(0, 1 - lr * strength / score_c), which sets whole channels exactly to zero. score_c
    (`channel_scores`) is linear in v_c: ||v_c|| / sqrt(n) for normalize=none, a per-layer weighted norm
    (weights fixed within the step) by default.

    The strength is searched at every step so that the dead share follows a ramp from 0 to the target,
    reached at `ramp` of the sparse phase. Channels die when their norm runs out, so the strength is set
    from the scores themselves: with channels ranked by score (`channel_scores`), the one the ramp wants dead
    `horizon` epochs from now is shrunk to zero in that time (absent its gradient); `boost` multiplies this
    and adapts slowly (integral control) to the gradients' push-back. When enough channels are dead already
    the strength is zero: no search overshoot. The prox acts only on the channels ranked within the target
    share (the same ranking as the final mask), so the dead share never exceeds the target and the mask
    fixed at `start_finetune` mostly takes channels that are already zero.
    """

    name = "group-lasso"

    def __init__(self, model: nn.Module, *, target: float, ramp: float = 0.8, horizon: float = 1.0,
                 gain: float = 0.1, **kw: Any) -> None:
        super().__init__(model, target=target, **kw)
        if not 0 < ramp <= 1 or horizon <= 0 or gain < 0:
            raise UsageError("group lasso needs ramp in (0, 1], horizon > 0 (epochs) and gain >= 0")
        self.ramp = float(ramp)
        self.horizon = float(horizon)
        self.gain = float(gain)
        self.boost = 1.0
        self.strength = 0.0  # the lambda of the last step (reported)

    def desired(self, ahead: int = 0) -> float:
        """Dead share the ramp asks for now, or `ahead` steps from now (0 until the run's length is known)."""
        if not self.epochs:
            return 0.0
        spe = self.steps_per_epoch or STEPS_PER_EPOCH_GUESS
        progress = (self.epoch + (self.steps_this_epoch + ahead) / spe) / self.sparse_epochs()
        return self.target * min(1.0, progress / self.ramp)

    @torch.no_grad()
    def sparse_step(self, model: nn.Module, lr: float) -> None:
        scores = self.channel_scores(model)  # linear in the function vector: shrinking it by f shrinks these by f
        candidates = self.fix_masks([s.cpu() for s in scores], warn=False)
        flat = torch.cat([s.cpu() for s in scores])
        total = flat.numel()
        horizon = max(1, round(self.horizon * (self.steps_per_epoch or STEPS_PER_EPOCH_GUESS)))
        k = min(total, math.ceil(self.desired(ahead=horizon) * total))
        tau = float(torch.kthvalue(flat, k).values) if k > 0 else 0.0
        rms_step = self.boost * tau / horizon  # shrink per step, in score units
        self.strength = rms_step / lr if lr > 0 else 0.0
        dead = 0
        for g, score, cand in zip(self.groups, scores, candidates):
            factor = torch.clamp(1 - rms_step / score.clamp_min(1e-30), min=0.0)
            factor = torch.where(cand.to(factor.device), factor, torch.ones_like(factor))
            for t in g.function_params(model):
                t.mul_(factor.to(t.dtype).view(_rows(t)))
            gone = factor == 0
            if gone.any():
                for t in g.follower_params(model):
                    t[gone] = 0
            dead += int(gone.sum())
        if self.target > 0:
            err = (self.desired() - dead / total) / self.target
            self.boost = min(64.0, max(0.25, self.boost * math.exp(self.gain * err)))

    def extra_stats(self) -> dict[str, Any]:
        return {"strength": self.strength, "boost": self.boost}

    def extra_state(self) -> dict[str, Any]:
        return {"ramp": self.ramp, "horizon": self.horizon, "gain": self.gain, "boost": self.boost,
                "strength": self.strength}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ramp = float(state["ramp"])
        self.horizon = float(state["horizon"])
        self.gain = float(state["gain"])
        self.boost = float(state["boost"])
        self.strength = float(state["strength"])


@register_sparsity("rgsm")
class RGSM(Sparsity):
    """Relaxed group-wise splitting (Dinh et al., "Sparsity Meets Robustness", arXiv 2003.00631).

    An auxiliary copy u of the group parameters is the group-L0 prox of w: a channel keeps its values in u
    when its function-vector norm exceeds sqrt(2 * lambda1 / beta), else u is zero there (recomputed after
    every step). The loss gets beta/2 ||w - u||^2, pulling below-threshold channels of w to zero, plus
    lambda2 * sum_c ||v_c|| (our reading of the paper's second, group-lasso term); w <- u at the end of
    every epoch makes those channels exactly zero. lambda1 sets a norm threshold, not a share, so the
    share reached at the paper's defaults depends on the model: the mask fixed at `start_finetune` is
    what hits the target.
    """

    name = "rgsm"

    def __init__(self, model: nn.Module, *, target: float, beta: float = 1.0, lambda1: float = 1e-2,
                 lambda2: float = 1e-5, **kw: Any) -> None:
        super().__init__(model, target=target, **kw)
        if beta <= 0 or lambda1 < 0 or lambda2 < 0:
            raise UsageError("RGSM needs beta > 0 and lambda1, lambda2 >= 0")
        self.beta = float(beta)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.u: list[list[torch.Tensor]] = []
        self.update_u(unwrap(model))

    @property
    def threshold(self) -> float:
        return math.sqrt(2 * self.lambda1 / self.beta)

    @torch.no_grad()
    def update_u(self, model: nn.Module) -> None:
        self.u = []
        for g in self.groups:
            keep = _sq_norms(g.function_params(model), g.size).sqrt() > self.threshold
            self.u.append([t.detach() * keep.to(t.dtype).view(_rows(t)) for t in g.all_params(model)])

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.finetuning:
            return None
        model = unwrap(model)
        total = None
        for g, us in zip(self.groups, self.u):
            params = g.all_params(model)
            term = sum(((t - u.to(t.device)) ** 2).sum() for t, u in zip(params, us)) * (self.beta / 2)
            if self.lambda2:
                fn = g.function_params(model)
                sq = sum(t.reshape(g.size, -1).pow(2).sum(1) for t in fn)
                term = term + self.lambda2 * (sq + 1e-12).sqrt().sum()
            total = term if total is None else total + term
        return total

    def sparse_step(self, model: nn.Module, lr: float) -> None:
        self.update_u(model)

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        if not self.finetuning:
            m = unwrap(model)
            for g, us in zip(self.groups, self.u):
                for t, u in zip(g.all_params(m), us):
                    t.copy_(u)
            self.update_u(m)
        super().end_epoch(model, epoch, epochs)

    def extra_stats(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def extra_state(self) -> dict[str, Any]:
        return {"beta": self.beta, "lambda1": self.lambda1, "lambda2": self.lambda2,
                "u": [[u.detach().cpu() for u in us] for us in self.u]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.lambda1 = float(state["lambda1"])
        self.lambda2 = float(state["lambda2"])
        self.u = [list(us) for us in state["u"]]


@register_sparsity("slimming")
class Slimming(Sparsity):
    """Network slimming (Liu et al. 2017): L1 on the BatchNorm scales of prunable groups, then the channels
    with the smallest |gamma| (RMS over the group's BNs) are pruned when the mask is fixed. Groups with no
    BatchNorm are never pruned by this method. Like every method, the scales are taken per BN by default
    (`normalize`); normalize=none ranks the raw |gamma| across layers as the paper does."""

    name = "slimming"

    def __init__(self, model: nn.Module, *, target: float, strength: float = 1e-4, **kw: Any) -> None:
        super().__init__(model, target=target, **kw)
        if strength < 0:
            raise UsageError("slimming strength must be >= 0")
        self.strength = float(strength)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.finetuning or not self.strength:
            return None
        model = unwrap(model)
        gammas = [model.get_submodule(name).weight for g in self.groups for name in g.bns]
        return self.strength * sum(w.abs().sum() for w in gammas) if gammas else None

    def score_layers(self, g: ChannelGroup, model: nn.Module) -> list[list[torch.Tensor]]:
        return [[model.get_submodule(name).weight] for name in g.bns]  # normalize=none: RMS of |gamma|

    def extra_state(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.strength = float(state["strength"])


def create_sparsity(name: str, model: nn.Module, **kwargs: Any) -> Sparsity:
    """Build a registered sparsity method; None kwargs fall back to the method's defaults."""
    cls = SPARSITY.get(name)
    kwargs = drop_none(kwargs)
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UsageError(f"sparsity method {name!r} has no setting {', '.join(unknown)}; "
                         f"it accepts: {', '.join(sorted(accepted))}")
    return cls(model, **kwargs)


def _accepted_kwargs(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return names
